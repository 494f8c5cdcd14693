//! Exit dispatch: what ends a guest, and the monitor VM's exits.

extern crate std;

use ihmi_abi::Hypercall;
use ihmi_addr::Gpa;
use ihmi_vmcs::fields::ro;
use ihmi_vmcs::ExitReason;

use crate::mock::{MockPlatform, MockVcpu, Seen};
use crate::testing::*;
use crate::{Action, GuestEnd, Observation, RegionKind};

#[test]
fn ept_violation_on_an_l0_frame_ends_the_guest_and_changes_nothing() {
    let mut h = hv();
    let mut v = MockVcpu::exited(EXIT_EPT_VIOLATION, 0x4000, 3);
    v.fields
        .insert(ro::GUEST_PHYSICAL_ADDR_FULL, L0_HOLE + 0x123);
    v.fields.insert(ro::EXIT_QUALIFICATION, 0x181); // read, GLA valid, caused by translation
    v.fields.insert(ro::GUEST_LINEAR_ADDR, L0_HOLE + 0x123);
    let Action::End(end) = h.handle_exit(&mut v, &mut MockPlatform::default()) else {
        panic!("guest must end")
    };
    assert!(matches!(
        end,
        GuestEnd::EptViolation {
            region: Some(RegionKind::L0),
            rip: 0x4000,
            ..
        }
    ));
    assert!(
        v.writes().is_empty(),
        "no VMCS (and so no EPT pointer) change"
    );
    assert_eq!(
        h.rec.seen.last(),
        Some(&Seen::Other(Observation::Ended { end, task: None })),
        "the end is reported, without a task (not a Linux guest)"
    );
    assert!(!h.memory.is_guest_ram(Gpa::new(L0_HOLE), 1));
}

#[test]
fn triple_fault_and_unknown_exits_end_the_guest_not_l0() {
    let mut h = hv();
    let mut p = MockPlatform::default();
    let mut v = MockVcpu::exited(EXIT_TRIPLE_FAULT, 0x5000, 0);
    assert_eq!(
        h.handle_exit(&mut v, &mut p),
        Action::End(GuestEnd::TripleFault {
            rip: 0x5000,
            view: None
        })
    );
    let mut v = MockVcpu::exited(EXIT_RDTSC, 0x5000, 2);
    assert!(matches!(
        h.handle_exit(&mut v, &mut p),
        Action::End(GuestEnd::Unhandled {
            reason: ExitReason::Rdtsc,
            ..
        })
    ));
    let mut v = MockVcpu::exited(0xffff, 0x5000, 2);
    assert!(matches!(
        h.handle_exit(&mut v, &mut p),
        Action::End(GuestEnd::Unhandled { .. })
    ));
    assert_eq!(h.counters.total(), 3);
}

#[test]
fn monitor_vm_exits_other_than_its_verdict_are_faults() {
    use crate::monitor_vm::{decode_exit, MonitorVmExit};
    let mut done = vmcall(ihmi_abi::monitor::OUTBOX_DONE, [0, 0, 0, 0]);
    done.regs.rbx = 1;
    assert_eq!(decode_exit(&mut done), MonitorVmExit::Done { verdict: 1 });
    // A VMCALL with another number, or any other exit, is a broken monitor VM.
    let mut other = vmcall(Hypercall::Ping as u64, [0; 4]);
    assert!(matches!(
        decode_exit(&mut other),
        MonitorVmExit::Fault {
            reason: ExitReason::Vmcall,
            ..
        }
    ));
    let mut ept = MockVcpu::exited(EXIT_EPT_VIOLATION, 0x6000_1000, 0);
    assert!(matches!(
        decode_exit(&mut ept),
        MonitorVmExit::Fault {
            reason: ExitReason::EptViolation,
            rip: 0x6000_1000,
            ..
        }
    ));
}
