//! The guard: VMFUNC refusals, the LSTAR lock, the audit of hook words, the view of an EPT violation.

extern crate std;

use std::vec;

use ihmi_abi::Hypercall;
use ihmi_addr::Gpa;
use ihmi_arch::msr::IA32_LSTAR;
use ihmi_vmcs::fields::{control, guest, ro};

use crate::mock::{Call, MockPlatform, MockVcpu, Op};
use crate::testing::*;
use crate::{Action, GuestEnd};

#[test]
fn vmfunc_with_a_bad_index_injects_ud_and_raises_an_alert_without_touching_the_eptp() {
    let (mut h, mut p) = guarded();
    let mut v = MockVcpu::exited(EXIT_VMFUNC, 0x7000, 3);
    v.regs.rax = 0;
    v.regs.rcx = 600;
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert_eq!(
        v.writes(),
        vec![(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0x8000_0306)],
        "only a #UD injection: no EPTP write, RIP not advanced"
    );
    assert_eq!(
        h.rec.alerts().as_slice(),
        [crate::Alert::VmfuncRefused {
            function: 0,
            index: 600,
            rip: 0x7000
        }]
    );
    assert!(p.calls.borrow().iter().any(
        |c| matches!(c, Call::Log(s) if s.starts_with("alert| {\"alert\":\"vmfunc-refused\""))
    ));
}

#[test]
fn lstar_is_installed_once_then_locked() {
    let (mut h, mut p) = guarded();
    let entry = 0xffff_ffff_8100_0040;
    let mut v = wrmsr_lstar(entry);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert_eq!(
        v.fields[&guest::RIP],
        0x8002,
        "the first write is performed"
    );
    assert!(p
        .calls
        .borrow()
        .contains(&Call::WriteMsr(IA32_LSTAR, entry)));
    // The same value again is harmless; a new one is refused with #GP and an alert.
    let mut same = wrmsr_lstar(entry);
    h.handle_exit(&mut same, &mut p);
    assert_eq!(same.fields[&guest::RIP], 0x8002);
    let mut other = wrmsr_lstar(0x1000);
    h.handle_exit(&mut other, &mut p);
    assert_eq!(other.fields[&guest::RIP], 0x8000, "not skipped");
    assert_eq!(
        other.fields[&control::VMENTRY_INTERRUPTION_INFO_FIELD],
        0x8000_0b0d,
        "#GP(0)"
    );
    let writes = p
        .calls
        .borrow()
        .iter()
        .filter(|c| matches!(c, Call::WriteMsr(..)))
        .count();
    assert_eq!(writes, 1, "the refused value never reached the MSR");
    assert!(matches!(
        h.rec.alerts().as_slice(),
        [crate::Alert::EntryMsrWriteRefused { value: 0x1000, .. }]
    ));
    // Without a monitor there is nothing to lock.
    let mut free = hv();
    let mut p2 = MockPlatform::default();
    free.handle_exit(&mut wrmsr_lstar(1), &mut p2);
    free.handle_exit(&mut wrmsr_lstar(2), &mut p2);
    assert!(free.rec.alerts().is_empty());
}

#[test]
fn a_changed_hook_pointer_ends_the_guest_at_the_next_exit() {
    let (mut h, mut p) = guarded();
    assert_eq!(
        h.handle_exit(&mut vmcall(Hypercall::Ping as u64, [0; 4]), &mut p),
        Action::Resume
    );
    p.write_u64(HOOK_GPA, 0);
    let end = h.handle_exit(&mut vmcall(Hypercall::Ping as u64, [0; 4]), &mut p);
    assert_eq!(
        end,
        Action::End(GuestEnd::HookTampered {
            gpa: Gpa::new(HOOK_GPA)
        })
    );
    assert!(matches!(
        h.rec.alerts().as_slice(),
        [crate::Alert::HookTampered {
            found: 0,
            expected: GATE,
            ..
        }]
    ));
}

#[test]
fn ept_violations_name_the_view_the_guest_was_in() {
    let (mut h, mut p) = guarded();
    let mut v = MockVcpu::exited(EXIT_EPT_VIOLATION, 0x1234, 0);
    v.fields.insert(control::EPTP_FULL, MONITOR_EPTP);
    v.fields.insert(ro::GUEST_PHYSICAL_ADDR_FULL, 0x1234);
    v.fields.insert(ro::EXIT_QUALIFICATION, 0b100); // instruction fetch
    assert!(matches!(
        h.handle_exit(&mut v, &mut p),
        Action::End(GuestEnd::EptViolation {
            view: Some(crate::guard::views::MONITOR_VIEW),
            ..
        })
    ));
}

#[test]
fn an_audited_word_that_cannot_be_read_counts_as_changed() {
    let (mut h, mut p) = guarded();
    p.fail_on(Op::ReadGuest, 1);
    let end = h.handle_exit(&mut vmcall(Hypercall::Ping as u64, [0; 4]), &mut p);
    assert_eq!(
        end,
        Action::End(GuestEnd::HookTampered {
            gpa: Gpa::new(HOOK_GPA)
        })
    );
    assert!(matches!(
        h.rec.alerts().as_slice(),
        [crate::Alert::HookTampered { .. }]
    ));
}

#[test]
fn a_non_canonical_lstar_gets_the_cpu_s_gp_and_never_reaches_the_msr() {
    // Guarded or not: L0 installs the value in the real MSR, where a non-canonical one would fault in L0.
    let (mut guarded, mut p) = guarded();
    let (mut free, mut q) = (hv(), MockPlatform::default());
    for (h, p) in [(&mut guarded, &mut p), (&mut free, &mut q)] {
        let mut v = wrmsr_lstar(0x0000_8000_0000_0000);
        assert_eq!(h.handle_exit(&mut v, p), Action::Resume);
        assert_eq!(v.fields[&guest::RIP], 0x8000, "not skipped");
        assert_eq!(
            v.fields[&control::VMENTRY_INTERRUPTION_INFO_FIELD],
            0x8000_0b0d,
            "#GP(0)"
        );
        assert!(!p
            .calls
            .borrow()
            .iter()
            .any(|c| matches!(c, Call::WriteMsr(..))));
        assert_eq!(
            h.guard.as_ref().and_then(|g| g.kernel_lstar()),
            None,
            "nothing locked"
        );
    }
}
