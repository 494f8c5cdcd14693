//! The last step of the boot flow and everything after it: VM exits go to the exit policy
//! (`ihmi-hv`), observed by the scenario's judge; the monitor's events are drained; and when the guest
//! ends, L0 reports, asks the judge for the verdict, prints it, and powers off. Nothing here ends L0
//! because of the guest: a guest's fault ends the guest ([`finish`]).

use core::fmt::Write;

use ihmi_hv::{Action, GuestEnd, GuestRegs, NestedSwitch, Platform, Vcpu};
use ihmi_judge::{
    judge_entry_failure, AttackContext, EntryFailure, Facts, MonitorAudit, MonitorCounts, Verdict,
};
use ihmi_rt::console::{Console, Sink};
use ihmi_vmcs::{VmExit, VmInstructionError};
use ihmi_vmx::HwVcpu;

use crate::monitor::Loaded;
use crate::state::{self, L0State};
use crate::{dump_vmcs, log, outbox, power_off};

/// Rejected-request events printed per drain of the monitor's ring; the rest are counted.
const REJECTED_PRINTED_PER_DRAIN: u64 = 8;

/// The state for this exit: the handlers below are the only ones the exit stub calls, one per exit.
fn state() -> &'static mut L0State {
    // SAFETY: called once at the top of each handler below, which the exit stub runs once per exit;
    // the state was installed before the first entry and the launch's reference is gone.
    match unsafe { state::get() } {
        Some(st) => st,
        // The stub is armed only by the launch, after `install`: an exit without state is an L0 bug.
        None => panic!("VM exit before L0 state was set up"),
    }
}

/// What the exit stub calls after every VM exit; returning resumes the current VMCS's guest.
pub extern "C" fn on_exit(regs: &mut GuestRegs) {
    let st = state();
    // A failed entry to L2 is L1's to hear about (the exit policy reflects it).
    let exit = HwVcpu::new(st.vmcss.active(), regs).exit();
    if let (
        VmExit::EntryFailure {
            reason,
            qualification,
        },
        false,
    ) = (exit, st.hv.in_l2())
    {
        log!(
            "VM entry failed: {} (exit qualification {qualification:#x})",
            reason.name()
        );
        dump_vmcs(&st.vmcss);
        entry_failed(st, EntryFailure::Exit(reason));
    }
    if st
        .outbox
        .as_ref()
        .is_some_and(outbox::MonitorVm::is_running)
    {
        if let Err(end) = outbox::on_exit(st, regs) {
            finish(st, end);
        }
        return;
    }
    // What the monitor saw happened before this exit: show it first.
    drain_monitor(st);
    // The monitor's counts now, for a benchmark window this exit may open or close.
    let counts = MonitorCounts {
        monitor_vm_exits: st.outbox.as_ref().map_or(0, outbox::MonitorVm::exits),
        invocations: st.monitor.as_ref().map_or(0, |m| m.invocations()),
    };
    // The shadow VMCS hangs off the guest's VMCS (VMCS01) only.
    let shadow = st.shadow_vmcs.filter(|_| !st.hv.in_l2());
    let mut vcpu = HwVcpu::new(st.vmcss.active(), regs).with_shadow_vmcs(shadow);
    let mut platform = st.machine.platform();
    let mut console = Console(Sink::Both);
    let mut observer = st.judge.observer(counts, &mut console);
    let action = st.hv.handle_exit(&mut vcpu, &mut platform, &mut observer);
    copy_kvm_ops(st);
    check_hook_liveness(st);
    match action {
        Action::Resume => {}
        Action::End(end) => finish(st, end),
        Action::SwitchVmcs(to) => {
            if let Err(end) = nested_switch(st, regs, to) {
                finish(st, end);
            }
        }
        Action::CallMonitor {
            code,
            args,
            verdict_to_rax,
            entry,
            caller_rsp,
        } => {
            let from = outbox::Caller {
                entry,
                rsp: caller_rsp,
            };
            if let Err(end) = outbox::enter(st, regs, code, args, verdict_to_rax, from) {
                finish(st, end);
            }
        }
    }
}

/// Whether L0 has armed the in-hypervisor monitor's hook in L1's KVM (at the kernel's first system
/// call, with the other hooks).
fn kvm_exit_hook_armed(st: &L0State) -> bool {
    st.hv
        .guard
        .as_ref()
        .and_then(|g| g.linux())
        .is_some_and(|l| l.armed_kvm_exit().is_some())
}

/// With the in-hypervisor monitor hooked into L1's KVM, once the exit that armed the hooks (the
/// kernel's first system call) is handled and before L1 runs on: `kvm_x86_ops` copied into the
/// monitor's configuration, what P2 holds the live struct to.
fn copy_kvm_ops(st: &mut L0State) {
    if !st.monitor.as_ref().is_some_and(Loaded::kvm_ops_pending) {
        return;
    }
    let armed = kvm_exit_hook_armed(st);
    let (Some(m), true) = (st.monitor.as_mut(), armed) else {
        return;
    };
    let platform = st.machine.platform();
    match m.copy_kvm_ops(|gpa, buf| platform.read_guest(gpa, buf)) {
        Ok(words) => {
            log!("monitor: kvm_x86_ops as the boot left it: {words} words, held to from now on")
        }
        Err(why) => log!("monitor: kvm_x86_ops goes unwatched: {why}"),
    }
}

/// With the in-hypervisor monitor hooked into L1's KVM: the hook still fires (P7,
/// `ihmi_hv::nested::liveness`): the exits L0 reflected to L1 against the KVM exits the monitor
/// served, said once as an alert if a whole window went by without one.
fn check_hook_liveness(st: &mut L0State) {
    let armed = kvm_exit_hook_armed(st);
    let (Some(m), Some(n), true) = (st.monitor.as_ref(), st.hv.nested_stats(), armed) else {
        return;
    };
    if let Some(s) = st.hook_liveness.check(n.reflected, m.kvm_exits()) {
        let alert = ihmi_hv::Alert::MonitorStarved {
            reflected: s.reflected,
            served: s.served,
        };
        log!("alert| {alert}");
        st.judge.log.record(&ihmi_hv::Observation::Alert(alert));
    }
}

/// Nested VMX: VMCS02 for L2 or VMCS01 for L1 made current, and the exit policy fills it in.
fn nested_switch(st: &mut L0State, regs: &mut GuestRegs, to: NestedSwitch) -> Result<(), GuestEnd> {
    let id = match to {
        NestedSwitch::ToL2 => st.nested_vmcs.ok_or(GuestEnd::L0Stopped {
            why: "an entry to L2 without a VMCS02",
        })?,
        NestedSwitch::ToL1 => st.guest_vmcs,
    };
    // SAFETY: both VMCSs are configured (VMCS02's host state at boot; its guest state and controls
    // are written right below, before the entry); the one CPU runs them; the registers the stub
    // restores are L1's or L2's, which a VMX transition shares.
    unsafe { st.vmcss.switch_to(id) }.map_err(|_| GuestEnd::L0Stopped {
        why: "VMPTRLD of a nested VMCS failed",
    })?;
    let shadow = st.shadow_vmcs.filter(|_| to == NestedSwitch::ToL1);
    let mut vcpu = HwVcpu::new(st.vmcss.active(), regs).with_shadow_vmcs(shadow);
    let counts = MonitorCounts {
        monitor_vm_exits: 0,
        invocations: 0,
    };
    let mut console = Console(Sink::Both);
    let mut observer = st.judge.observer(counts, &mut console);
    match st.hv.on_vmcs_switched(&mut vcpu, &mut observer, to) {
        Action::Resume => Ok(()),
        Action::End(end) => Err(end),
        _ => Err(GuestEnd::L0Stopped {
            why: "a nested switch asked for another",
        }),
    }
}

/// What the stubs call when VMLAUNCH or VMRESUME fails outright; gets RFLAGS right after it.
pub extern "C" fn on_entry_failed(rflags: u64) -> ! {
    const CF: u64 = 1;
    const ZF: u64 = 1 << 6;
    let st = state();
    let failure = if rflags & ZF != 0 {
        let err: VmInstructionError = st.vmcss.active().instruction_error();
        log!(
            "VM entry failed: VMfailValid, VM-instruction error {} ({err})",
            err.raw()
        );
        EntryFailure::FailValid(err)
    } else {
        if rflags & CF == 0 {
            log!("VM entry failed with neither CF nor ZF set (rflags {rflags:#x}); treating as VMfailInvalid");
        }
        log!("VM entry failed: VMfailInvalid (no valid current VMCS)");
        EntryFailure::FailInvalid
    };
    dump_vmcs(&st.vmcss);
    entry_failed(st, failure)
}

/// A VM entry failed and has been reported: pass only if the scenario asked for exactly this failure.
fn entry_failed(st: &mut L0State, failure: EntryFailure) -> ! {
    report(st, judge_entry_failure(st.judge.scenario(), failure))
}

/// The guest has stopped: report, judge, and power off.
pub fn finish(st: &mut L0State, end: GuestEnd) -> ! {
    drain_monitor(st);
    // Ends L0 decides itself (a broken monitor VM) reach the judge here; the exit policy's were
    // observed already.
    st.judge.record_end(end);
    log!("guest ended: {end}");
    if let Some(m) = st.monitor.as_mut() {
        let ring = m.ring();
        let (produced, dropped) = (ring.produced(), ring.dropped());
        log!("monitor: {produced} events, {dropped} dropped");
        let linear = m.linear_windows();
        st.judge.set_linear_reads(linear);
        if let Some([direct, image]) = linear {
            let said = |len: u64| {
                if len == 0 {
                    "not held (read by walks)"
                } else {
                    "held"
                }
            };
            log!(
                "monitor: linear reads: direct map {} ({direct} bytes), kernel image {} ({image} bytes)",
                said(direct),
                said(image)
            );
        }
    }
    if let Some(o) = &st.outbox {
        log!(
            "monitor VM: {} calls, {} exits of its own",
            o.calls(),
            o.exits()
        );
    }
    if let Some(n) = st.hv.nested_stats() {
        if n.entries > 0 || n.entry_failures > 0 {
            log!(
                "nested: {} entries to L2 ({} failed the guest-state checks), {} exits from L2, {} of them reflected to L1",
                n.entries,
                n.entry_failures,
                n.l2_exits,
                n.reflected
            );
        }
        if n.entries > 0 {
            let shadowing = st.hv.nested.as_ref().is_some_and(|v| v.shadowing());
            let monitor = MonitorCounts {
                monitor_vm_exits: st.outbox.as_ref().map_or(0, outbox::MonitorVm::exits),
                invocations: st.monitor.as_ref().map_or(0, |m| m.invocations()),
            };
            let served = st.monitor.as_ref().map_or(0, |m| m.kvm_exits());
            let hooks = ihmi_judge::bench::HookCounts {
                hook_counts: st.monitor.as_ref().map_or([0; 3], |m| m.hook_counts()),
                gate_switches: match (&st.monitor, &st.outbox) {
                    (Some(m), None) => [m.gate_vmfuncs, m.gate_cr3_loads],
                    _ => [0; 2],
                },
            };
            ihmi_judge::bench::nested_line(
                &n,
                shadowing,
                monitor,
                served,
                hooks,
                &mut Console(Sink::Both),
            );
        }
        if n.round_trips > 0 {
            log!(
                "nested: L0 exits per reflected exit (the exit, L1's handling, its VMRESUME): {} at most, {} in all over {}: {} reflected exits, {} VMRESUMEs, {} VMREADs and VMWRITEs, {} others",
                n.round_trip_max,
                n.round_trip_total,
                n.round_trips,
                n.round_trips,
                n.round_trips,
                n.round_trip_vmread_vmwrite,
                n.round_trip_other
            );
        }
        if let Some(e) = st.hv.nested.as_ref().and_then(|v| v.ept02()) {
            log!(
                "nested: EPT02: {} pages filled from L1's EPT, emptied {} times (INVEPT, a new EPTP12, a full pool, L0's view changed)",
                e.fills,
                e.resets
            );
        }
        if n.cpuid_round_trips > 0 {
            log!(
                "nested: of them CPUIDs: {} at most, {} in all over {}",
                n.cpuid_round_trip_max,
                n.cpuid_round_trip_total,
                n.cpuid_round_trips
            );
        }
    }
    log!("exit counters ({} exits):", st.hv.counters.total());
    for (reason, count) in st.hv.counters.nonzero() {
        log!("  {:<30} {count:>8}", reason.name());
    }
    let nmi = st.hv.nmi_counts();
    if nmi.taken > 0 {
        log!(
            "nmi: L0 took {} ({} with the guest in the monitor's view, {} merged into a waiting one), delivered {}",
            nmi.taken,
            nmi.in_monitor_view,
            nmi.merged,
            nmi.delivered
        );
    }
    // Every run with a monitor ends with the monitor as L0 finds it now; an attack's verdict needs
    // where its parts are too.
    let wrote = st.machine.monitor_words.map(|w| w.map(|g| g.value));
    let audit = st.monitor.as_mut().map(|m| {
        let integrity = m.integrity(wrote);
        let audit = MonitorAudit {
            image_intact: integrity.intact(),
            ring_consistent: m.ring().is_consistent(),
        };
        log!(
            "monitor audit: checksum {:#018x} (at load {:#018x}){}, ring consistent: {}",
            integrity.checksum,
            integrity.at_load,
            Granted(integrity.words),
            audit.ring_consistent
        );
        (audit, m.layout.gate)
    });
    let attack = audit
        .filter(|_| st.judge.scenario().attack().is_some())
        .map(|(audit, gate)| AttackContext {
            gate,
            guest_code: st.guest_code.as_slice(),
            hook: st.hook,
            audit,
        });
    let facts = Facts {
        probe: st.probe,
        probe_region: st.hv.memory.classify(st.probe),
        monitor: audit.map(|(a, _)| a),
        attack,
    };
    let verdict = st
        .judge
        .verdict(&st.hv.counters, &facts, &mut Console(Sink::Both));
    report(st, verdict)
}

/// The granted words in the audit line: what each holds against what L0 wrote.
struct Granted(Option<[(u64, u64); 3]>);

impl core::fmt::Display for Granted {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let Some(words) = self.0 else {
            return Ok(());
        };
        f.write_str(", kernel entry words")?;
        for (found, wrote) in words {
            write!(f, " {found:#x}")?;
            if found != wrote {
                write!(f, " (L0 wrote {wrote:#x})")?;
            }
        }
        Ok(())
    }
}

/// Prints the verdict's marker and powers off.
fn report(st: &L0State, verdict: Verdict) -> ! {
    let name = st.judge.scenario().name();
    match verdict {
        Verdict::Pass => log!("IHMI-PASS {name}"),
        Verdict::Fail(reason) => log!("IHMI-FAIL {name}: {reason}"),
    }
    power_off()
}

/// Takes the monitor's new events out of its ring: each becomes a JSON line on the console and an entry
/// in the judge's log.
pub fn drain_monitor(st: &mut L0State) {
    let Some(m) = st.monitor.as_mut() else {
        return;
    };
    let judge = &mut st.judge;
    let mode = judge.scenario().monitor_mode().name();
    let print = ihmi_judge::setup::prints_events(judge.scenario());
    let (ring, os) = m.ring_and_os();
    // Rejected requests are what a flood is made of: a few are printed per drain, the rest counted and
    // said, so a guest cannot flood the console either.
    let mut rejected = 0u64;
    let mut console = Console(Sink::Both);
    ring.drain(|e| {
        let is_rejected = e.kind() == Some(ihmi_monitor::EventKind::Rejected);
        rejected += u64::from(is_rejected);
        if print && (!is_rejected || rejected <= REJECTED_PRINTED_PER_DRAIN) {
            let _ = writeln!(console, "event| {}", e.json(mode, os));
        }
        judge.record_monitor_event(e);
    });
    if print && rejected > REJECTED_PRINTED_PER_DRAIN {
        log!(
            "monitor: {} more rejected requests in this drain, counted but not printed",
            rejected - REJECTED_PRINTED_PER_DRAIN
        );
    }
    judge.set_monitor_dropped(ring.dropped());
}
