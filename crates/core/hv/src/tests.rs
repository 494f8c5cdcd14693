//! Exit-handling tests against the recording mock.

extern crate std;

use std::vec;

use ihmi_abi::{CpuidRecord, Hypercall, ReportKind, Status, PING_REPLY};
use ihmi_addr::{Gpa, Hpa, PhysRange};
use ihmi_vmcs::fields::{control, guest, ro};
use ihmi_vmcs::ExitReason;

use crate::mock::{Call, MockPlatform, MockVcpu, Recorder, Seen};
use crate::{Action, GuestEnd, Hypervisor, MemoryMap, Observation, RegionKind};

// Basic exit reasons (SDM Appendix C), as the VMCS reports them.
const EXIT_EXCEPTION: u32 = 0;
const EXIT_TRIPLE_FAULT: u32 = 2;
const EXIT_CPUID: u32 = 10;
const EXIT_HLT: u32 = 12;
const EXIT_RDTSC: u32 = 16;
const EXIT_VMCALL: u32 = 18;
const EXIT_IO: u32 = 30;
const EXIT_RDMSR: u32 = 31;
const EXIT_WRMSR: u32 = 32;
const EXIT_EPT_VIOLATION: u32 = 48;

/// Guest RAM 0..16 MiB except an L0 hole at 8..9 MiB.
const L0_HOLE: u64 = 0x80_0000;

/// The hypervisor under test and everything it reported.
struct TestHv {
    hv: Hypervisor,
    rec: Recorder,
}

impl TestHv {
    fn handle_exit(&mut self, v: &mut MockVcpu, p: &mut MockPlatform) -> Action {
        self.hv.handle_exit(v, p, &mut self.rec)
    }
}

impl core::ops::Deref for TestHv {
    type Target = Hypervisor;
    fn deref(&self) -> &Hypervisor {
        &self.hv
    }
}

impl core::ops::DerefMut for TestHv {
    fn deref_mut(&mut self) -> &mut Hypervisor {
        &mut self.hv
    }
}

fn hv() -> TestHv {
    let mut m = MemoryMap::default();
    let r = |a: u64, b: u64| PhysRange {
        start: Hpa::new(a),
        end: Hpa::new(b),
    };
    m.add(r(0, L0_HOLE), RegionKind::GuestRam).unwrap();
    m.add(r(L0_HOLE, L0_HOLE + 0x10_0000), RegionKind::L0)
        .unwrap();
    m.add(r(L0_HOLE + 0x10_0000, 0x100_0000), RegionKind::GuestRam)
        .unwrap();
    TestHv {
        hv: Hypervisor::new(m),
        rec: Recorder::default(),
    }
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
fn ping_touches_only_the_registers_rip_and_nothing_else() {
    let mut h = hv();
    let mut v = vmcall(Hypercall::Ping as u64, [0; 4]);
    let mut p = MockPlatform::default();
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert_eq!(
        v.calls,
        vec![
            Call::Read(guest::SS_ACCESS_RIGHTS),
            Call::Read(guest::RIP),
            Call::Write(guest::RIP, 0x10_0003),
            Call::Read(guest::INTERRUPTIBILITY_STATE),
        ]
    );
    assert_eq!((v.regs.rax, v.regs.rbx), (0, PING_REPLY));
    assert!(p.calls.borrow().is_empty());
    assert_eq!(h.counters.get(ExitReason::Vmcall), 1);
}

#[test]
fn hypercall_from_user_mode_is_denied_without_reading_memory() {
    let mut h = hv();
    let mut v = vmcall(Hypercall::ConsoleWrite as u64, [0x5000, 4, 0, 0]);
    v.fields.insert(guest::SS_ACCESS_RIGHTS, 0xc0f3); // DPL 3
    let mut p = platform_with_identity_paging();
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert_eq!(ihmi_abi::Status::from_raw(v.regs.rax), Some(Status::Denied));
    assert!(p.phys_reads().is_empty());
    assert_eq!(
        v.fields[&guest::RIP],
        0x10_0003,
        "the guest continues after the call"
    );
}

#[test]
fn unknown_hypercall_is_rejected_and_the_guest_continues() {
    let mut h = hv();
    for nr in [4, 0xdead, u64::MAX] {
        let mut v = vmcall(nr, [0; 4]);
        let mut p = MockPlatform::default();
        assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
        assert_eq!(Status::from_raw(v.regs.rax), Some(Status::UnknownCall));
        assert_eq!(v.regs.rbx, 0, "no result value on failure");
    }
}

#[test]
fn console_write_walks_guest_page_tables_and_prints_a_prefixed_line() {
    let mut h = hv();
    let mut p = platform_with_identity_paging();
    p.write_bytes(0x5000, b"IHMI-PASS boot\n");
    let mut v = vmcall(Hypercall::ConsoleWrite as u64, [0x5000, 15, 0, 0]);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert_eq!(Status::from_raw(v.regs.rax), Some(Status::Ok));
    assert_eq!(v.regs.rbx, 15);
    assert_eq!(
        p.guest_texts(),
        vec!["guest| IHMI-PASS boot"],
        "guest text is prefixed and kept off the marker channel"
    );
}

#[test]
fn console_write_validation() {
    let mut p = platform_with_identity_paging();
    p.write_bytes(0x5000, b"x");
    let cases: [([u64; 4], Status); 5] = [
        ([0x5000, 0, 0, 0], Status::InvalidArgument),
        ([0x5000, 257, 0, 0], Status::InvalidArgument),
        ([0x8000_0000_0000_0000, 1, 0, 0], Status::BadAddress),
        ([0x4000_0000, 1, 0, 0], Status::BadAddress), // beyond the 1 GiB the tables map
        ([L0_HOLE + 0x10, 1, 0, 0], Status::BadAddress),
    ];
    for (args, expected) in cases {
        let mut h = hv();
        let mut v = vmcall(Hypercall::ConsoleWrite as u64, args);
        assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
        assert_eq!(
            Status::from_raw(v.regs.rax),
            Some(expected),
            "args {args:x?}"
        );
    }
    // L0 never read a byte of its own memory on the guest's behalf.
    assert!(p
        .phys_reads()
        .iter()
        .all(|(g, n)| g.raw() + *n as u64 <= L0_HOLE || g.raw() >= L0_HOLE + 0x10_0000));
}

#[test]
fn page_tables_pointing_into_l0_memory_are_not_walked() {
    let mut h = hv();
    let mut p = platform_with_identity_paging();
    let mut v = vmcall(Hypercall::ConsoleWrite as u64, [0x5000, 1, 0, 0]);
    v.fields.insert(guest::CR3, L0_HOLE); // a forged CR3 in L0 memory
    h.handle_exit(&mut v, &mut p);
    assert_eq!(Status::from_raw(v.regs.rax), Some(Status::BadAddress));
    assert!(
        p.phys_reads().is_empty(),
        "the walk stopped before reading L0 memory"
    );
}

#[test]
fn report_records_cpuid_and_rejects_bad_kinds_and_lengths() {
    let mut h = hv();
    let mut p = platform_with_identity_paging();
    let rec = CpuidRecord {
        leaf: 1,
        subleaf: 0,
        regs: [1, 2, 3, 4],
    };
    p.write_bytes(0x6000, &rec.encode());
    for (args, expected) in [
        ([ReportKind::Cpuid as u64, 0x6000, 24, 0], Status::Ok),
        ([99, 0x6000, 24, 0], Status::InvalidArgument),
        (
            [ReportKind::Cpuid as u64, 0x6000, 23, 0],
            Status::InvalidArgument,
        ),
        (
            [ReportKind::Cpuid as u64, 0x6000, u64::MAX, 0],
            Status::InvalidArgument,
        ),
    ] {
        let mut v = vmcall(Hypercall::Report as u64, args);
        h.handle_exit(&mut v, &mut p);
        assert_eq!(Status::from_raw(v.regs.rax), Some(expected));
    }
    assert_eq!(h.rec.hypercalls().len(), 4);
}

#[test]
fn cpuid_hides_vmx_and_announces_ihmi() {
    let mut h = hv();
    let mut p = MockPlatform::default();
    let mut v = MockVcpu::exited(EXIT_CPUID, 0x1000, 2);
    v.regs.rax = 1;
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert_eq!(v.regs.rcx & (1 << 5), 0);
    assert_ne!(v.regs.rcx & (1 << 31), 0);
    assert_eq!(v.fields[&guest::RIP], 0x1002);

    let mut v = MockVcpu::exited(EXIT_CPUID, 0x1000, 2);
    v.regs.rax = 0x4000_0000;
    h.handle_exit(&mut v, &mut p);
    let sig: std::vec::Vec<u8> = [v.regs.rbx, v.regs.rcx, v.regs.rdx]
        .iter()
        .flat_map(|r| (*r as u32).to_le_bytes())
        .collect();
    assert_eq!(&sig[..], ihmi_abi::CPUID_SIGNATURE);
    assert_eq!(v.regs.rax, 0x4000_0001);
    assert!(
        !p.calls.borrow().contains(&Call::HostCpuid(0x4000_0000, 0)),
        "the host's hypervisor leaves never leak"
    );
}

#[test]
fn vmx_msrs_fault_and_feature_control_reads_locked() {
    let mut h = hv();
    let mut p = MockPlatform::default();
    let mut v = MockVcpu::exited(EXIT_RDMSR, 0x1000, 2);
    v.regs.rcx = 0x3a;
    h.handle_exit(&mut v, &mut p);
    assert_eq!((v.regs.rax, v.regs.rdx), (1, 0));
    assert_eq!(v.fields[&guest::RIP], 0x1002);

    let mut v = MockVcpu::exited(EXIT_RDMSR, 0x1000, 2);
    v.regs.rcx = 0x480;
    h.handle_exit(&mut v, &mut p);
    assert_eq!(
        v.writes(),
        vec![
            (control::VMENTRY_EXCEPTION_ERR_CODE, 0),
            (control::VMENTRY_INTERRUPTION_INFO_FIELD, 0x8000_0b0d)
        ],
        "#GP(0) injected, RIP untouched"
    );

    let mut v = MockVcpu::exited(EXIT_WRMSR, 0x1000, 2);
    v.regs.rcx = 0x3a;
    h.handle_exit(&mut v, &mut p);
    assert_eq!(
        v.writes().last(),
        Some(&(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0x8000_0b0d))
    );
    assert_eq!(h.rec.gp_faults(), 2);
}

fn io_out(port: u16, byte: u8) -> MockVcpu {
    let mut v = MockVcpu::exited(EXIT_IO, 0x2000, 1);
    v.fields
        .insert(ro::EXIT_QUALIFICATION, u64::from(port) << 16); // 1 byte, OUT, DX form
    v.regs.rax = u64::from(byte);
    v
}

#[test]
fn debug_port_lines_and_the_shutdown_port() {
    let mut h = hv();
    let mut p = MockPlatform::default();
    for &b in b"hi\n" {
        assert_eq!(h.handle_exit(&mut io_out(0xe9, b), &mut p), Action::Resume);
    }
    assert_eq!(p.guest_texts(), vec!["guest| hi"]);
    assert_eq!(
        h.rec.debug_lines(),
        vec!["hi"],
        "the line is observed as well"
    );
    let mut last = Action::Resume;
    for &b in b"Shutdown" {
        last = h.handle_exit(&mut io_out(0x8900, b), &mut p);
    }
    assert_eq!(last, Action::End(GuestEnd::ShutdownRequest));
    assert_eq!(
        h.handle_exit(&mut io_out(0xcf9, 0x06), &mut p),
        Action::End(GuestEnd::ResetRequest)
    );
}

#[test]
fn string_io_ends_the_guest_instead_of_guessing() {
    let mut h = hv();
    let mut v = MockVcpu::exited(EXIT_IO, 0x2000, 2);
    v.fields
        .insert(ro::EXIT_QUALIFICATION, (0xe9 << 16) | (1 << 4));
    assert!(matches!(
        h.handle_exit(&mut v, &mut MockPlatform::default()),
        Action::End(GuestEnd::Unhandled { .. })
    ));
}

#[test]
fn hlt_resumes_with_interrupts_on_and_ends_with_them_off() {
    let mut h = hv();
    let mut p = MockPlatform::default();
    let mut v = MockVcpu::exited(EXIT_HLT, 0x3000, 1);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert_eq!(v.fields[&guest::RIP], 0x3001);
    let mut v = MockVcpu::exited(EXIT_HLT, 0x3000, 1);
    v.fields.insert(guest::RFLAGS, 0x2);
    assert_eq!(
        h.handle_exit(&mut v, &mut p),
        Action::End(GuestEnd::HaltedForever { rip: 0x3000 })
    );
}

#[test]
fn breakpoint_is_counted_and_reinjected_as_a_software_exception() {
    let mut h = hv();
    let mut v = MockVcpu::exited(EXIT_EXCEPTION, 0x3000, 1);
    v.fields.insert(ro::VMEXIT_INTERRUPTION_INFO, 0x8000_0603);
    assert_eq!(
        h.handle_exit(&mut v, &mut MockPlatform::default()),
        Action::Resume
    );
    assert_eq!(
        v.writes(),
        vec![
            (control::VMENTRY_INSTRUCTION_LEN, 1),
            (control::VMENTRY_INTERRUPTION_INFO_FIELD, 0x8000_0603)
        ]
    );
    assert_eq!(h.counters.exceptions(3), 1);
}

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
fn vmx_instructions_get_ud_while_l0_offers_no_vmx() {
    // VMXON (27), VMPTRLD (21), VMREAD (23), INVEPT (50): the guest sees what a CPU without VMX gives.
    for reason in [27, 21, 23, 50] {
        let mut h = hv();
        let mut p = MockPlatform::default();
        let mut v = MockVcpu::exited(reason, 0x5000, 4);
        assert_eq!(
            h.handle_exit(&mut v, &mut p),
            Action::Resume,
            "reason {reason}"
        );
        assert_eq!(
            v.writes(),
            vec![(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0x8000_0306)],
            "#UD, hardware exception, no error code; RIP stays at the instruction"
        );
        assert!(p.calls.borrow().is_empty());
    }
}

const EXIT_VMFUNC: u32 = 59;
const GUEST_EPTP: u64 = 0xa01e;
const MONITOR_EPTP: u64 = 0xb01e;
const HOOK_GPA: u64 = 0x20_0000;
const GATE: u64 = 0xf0_0000;

fn guarded() -> (TestHv, MockPlatform) {
    let mut h = hv();
    h.guard = Some(crate::Guard::new(
        crate::ViewEptps {
            guest: GUEST_EPTP,
            monitor: Some(MONITOR_EPTP),
        },
        Some((Gpa::new(HOOK_GPA), GATE)),
    ));
    let mut p = MockPlatform::default();
    p.write_u64(HOOK_GPA, GATE);
    (h, p)
}

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

fn wrmsr_lstar(value: u64) -> MockVcpu {
    let mut v = MockVcpu::exited(EXIT_WRMSR, 0x8000, 2);
    v.regs.rcx = u64::from(crate::guard::IA32_LSTAR);
    v.regs.rax = value & 0xffff_ffff;
    v.regs.rdx = value >> 32;
    v
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
        .contains(&Call::WriteMsr(crate::guard::IA32_LSTAR, entry)));
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
        [crate::Alert::LstarWriteRefused { value: 0x1000, .. }]
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
        Action::End(GuestEnd::EptViolation { view: Some(1), .. })
    ));
}

#[test]
fn monitor_hypercall_goes_to_the_monitor_vm_only_when_there_is_one() {
    // Without a monitor VM it is an unknown call, and nothing else happens.
    let mut h = hv();
    let mut v = vmcall(Hypercall::Monitor as u64, [1, 2, 3, 4]);
    v.regs.rdi = 5;
    assert_eq!(
        h.handle_exit(&mut v, &mut MockPlatform::default()),
        Action::Resume
    );
    assert_eq!(v.regs.rax, Status::UnknownCall.to_raw());
    // With one, L0 is told to run the request (code in RBX, arguments in RCX, RDX, RSI, RDI), and the
    // guest's VMCALL is already skipped so it resumes after it.
    let mut h = hv();
    h.outbox_monitor = true;
    let mut v = vmcall(Hypercall::Monitor as u64, [1, 2, 3, 4]);
    v.regs.rdi = 5;
    assert_eq!(
        h.handle_exit(&mut v, &mut MockPlatform::default()),
        Action::CallMonitor {
            code: 1,
            args: [2, 3, 4, 5],
            verdict_to_rax: true,
        }
    );
    assert_eq!(v.fields[&guest::RIP], 0x10_0003);
    // From ring 3 it is denied like every hypercall.
    let mut user = vmcall(Hypercall::Monitor as u64, [1, 2, 3, 4]);
    user.fields.insert(guest::SS_ACCESS_RIGHTS, 0xc0f3);
    assert_eq!(
        h.handle_exit(&mut user, &mut MockPlatform::default()),
        Action::Resume
    );
    assert_eq!(user.regs.rax, Status::Denied.to_raw());
}

#[test]
fn monitor_vm_exits_other_than_its_verdict_are_faults() {
    use crate::outbox::{decode_exit, MonitorVmExit};
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

#[test]
fn keyboard_controller_commands_pass_but_its_reset_pulse_ends_the_guest() {
    let mut h = hv();
    let mut p = MockPlatform::default();
    // A status read goes to the controller, and its answer to the guest.
    let mut read = MockVcpu::exited(EXIT_IO, 0x2000, 1);
    read.fields
        .insert(ro::EXIT_QUALIFICATION, (0x64 << 16) | (1 << 3)); // IN AL, 0x64
    assert_eq!(h.handle_exit(&mut read, &mut p), Action::Resume);
    assert_eq!(read.regs.rax & 0xff, 0x1c);
    // An ordinary command goes on; the reset pulse does not, and ends the guest instead.
    assert_eq!(
        h.handle_exit(&mut io_out(0x64, 0xad), &mut p),
        Action::Resume
    );
    assert_eq!(
        h.handle_exit(&mut io_out(0x64, 0xfe), &mut p),
        Action::End(GuestEnd::ResetRequest)
    );
    let calls = p.calls.borrow();
    assert!(calls.contains(&Call::PortIn(0x64)));
    assert!(calls.contains(&Call::PortOut(0x64, 0xad)));
    assert!(
        !calls.contains(&Call::PortOut(0x64, 0xfe)),
        "the reset never reached the device"
    );
}

#[test]
fn cpuid_osxsave_follows_the_guest_cr4_not_l0s() {
    let mut h = hv();
    let mut p = MockPlatform::default();
    for (cr4, expected) in [(0u64, 0u32), (1 << 18, 1 << 27)] {
        let mut v = MockVcpu::exited(EXIT_CPUID, 0x1000, 2);
        v.regs.rax = 1;
        v.fields.insert(guest::CR4, cr4);
        h.handle_exit(&mut v, &mut p);
        // The mock host reports XSAVE (bit 26) and OSXSAVE (bit 27) set.
        assert_eq!(v.regs.rcx as u32 & (1 << 27), expected, "CR4 {cr4:#x}");
    }
}

#[test]
fn xsetbv_is_checked_then_performed() {
    const EXIT_XSETBV: u32 = 55;
    let mut h = hv();
    let mut p = MockPlatform::default();
    // The mock host's CPUID leaf 0xD reports XCR0 bits 0xd (x87, AVX, bit 3): x87 alone is valid.
    let mut ok = MockVcpu::exited(EXIT_XSETBV, 0x3000, 3);
    ok.regs.rax = 1;
    assert_eq!(h.handle_exit(&mut ok, &mut p), Action::Resume);
    assert_eq!(ok.fields[&guest::RIP], 0x3003);
    assert!(p.calls.borrow().contains(&Call::Xsetbv(1)));
    // AVX without SSE, or a non-zero index, gets #GP and changes nothing.
    for (rax, rcx) in [(0b101u64, 0u64), (1, 1)] {
        let mut bad = MockVcpu::exited(EXIT_XSETBV, 0x3000, 3);
        bad.regs.rax = rax;
        bad.regs.rcx = rcx;
        h.handle_exit(&mut bad, &mut p);
        assert_eq!(bad.fields[&guest::RIP], 0x3000);
        assert_eq!(
            bad.fields[&control::VMENTRY_INTERRUPTION_INFO_FIELD],
            0x8000_0b0d
        );
    }
    let sets = p
        .calls
        .borrow()
        .iter()
        .filter(|c| matches!(c, Call::Xsetbv(_)))
        .count();
    assert_eq!(sets, 1);
}

#[test]
fn the_running_linux_task_is_read_through_the_profile() {
    use ihmi_linux::profile::{Field, LinuxProfile};
    let mut h = hv();
    h.linux = Some(LinuxProfile {
        current_task: 0x8, // a per-CPU offset
        init_top_pgt: 0,
        entry_syscall_64: 0,
        pid: Field {
            offset: 0x10,
            size: 4,
        },
        tgid: Field {
            offset: 0x14,
            size: 4,
        },
        comm: Field {
            offset: 0x20,
            size: 16,
        },
        real_parent: Field {
            offset: 0x18,
            size: 8,
        },
        exec_hook: 0,
        kernel_end: 0,
        binprm_filename: Field::default(),
        pti_pgd_pair: false,
    });
    let mut p = platform_with_identity_paging();
    // Per-CPU area at 0x10_0000 (the kernel's GS base); current_task -> task at 0x30_0000, whose
    // parent is the task at 0x30_1000.
    p.write_u64(0x10_0008, 0x30_0000);
    p.write_bytes(0x30_0010, &7u32.to_le_bytes());
    p.write_bytes(0x30_0014, &7u32.to_le_bytes());
    p.write_u64(0x30_0018, 0x30_1000);
    p.write_bytes(0x30_0020, b"ihmi-poweroff\0\0\0");
    p.write_bytes(0x30_1014, &1u32.to_le_bytes());
    // In the kernel: GS is the kernel's.
    let mut v = MockVcpu::exited(EXIT_IO, 0x2000, 1);
    v.fields.insert(guest::GS_BASE, 0x10_0000);
    let t = h.current_linux_task(&mut v, &mut p).unwrap();
    assert_eq!((t.task, t.pid, t.tgid, t.ppid), (0x30_0000, 7, 7, 1));
    assert_eq!(&t.comm[..13], b"ihmi-poweroff");
    // In user mode: the kernel's GS base is in IA32_KERNEL_GS_BASE, and GS is the user's.
    let mut user = MockVcpu::exited(EXIT_IO, 0x2000, 1);
    user.fields.insert(guest::SS_ACCESS_RIGHTS, 0xc0f3);
    user.fields.insert(guest::GS_BASE, 0xdead_0000);
    p.msrs.insert(0xc000_0102, 0x10_0000);
    assert_eq!(h.current_linux_task(&mut user, &mut p).unwrap().pid, 7);
    // A dangling pointer is an error, and so is a profile whose sizes do not fit.
    p.write_u64(0x10_0008, 0x7fff_0000_0000);
    assert!(matches!(
        h.current_linux_task(&mut v, &mut p),
        Err(crate::linux::TaskError::Walk(_))
    ));
    h.linux.as_mut().unwrap().comm.size = 8;
    assert_eq!(
        h.current_linux_task(&mut v, &mut p),
        Err(crate::linux::TaskError::FieldSize("comm"))
    );
    h.linux = None;
    assert_eq!(
        h.current_linux_task(&mut v, &mut p),
        Err(crate::linux::TaskError::NoProfile)
    );
}

fn linux_guarded() -> (TestHv, MockPlatform, crate::LinuxGate) {
    let (mut h, p) = guarded();
    let gate = crate::LinuxGate {
        gate_entry: 0xffff_e900_0000_00ad,
        kernel_entry_slot: Gpa::new(0x40_0ff8),
        pgd: Gpa::new(0x50_0000),
        slot: 466,
        pml4e: 0x60_0023,
        pti_pgd_pair: true,
        gate_page: Gpa::new(LINUX_GATE_PAGE),
        exec_hook: Some(crate::linux_hooks::ExecHook {
            site: 0xffff_ffff_8112_6cf9,
            site_pa: Gpa::new(0x112_6cf9),
            trampoline: HOOK_SLOT + 0x1d8,
            slot_va: HOOK_SLOT,
            table: Gpa::new(0x40_4000),
            gate_page: Gpa::new(LINUX_GATE_PAGE),
            pgd: Gpa::new(0x50_0000),
        }),
        outbox_syscall: None,
    };
    h.guard.as_mut().unwrap().hook = None;
    h.guard.as_mut().unwrap().linux_gate = Some(gate);
    (h, p, gate)
}

#[test]
fn the_kernel_s_syscall_entry_is_redirected_through_the_gate_once() {
    let (mut h, mut p, gate) = linux_guarded();
    let kernel_entry = 0xffff_ffff_8120_0080;
    h.handle_exit(&mut wrmsr_lstar(kernel_entry), &mut p);
    let calls = p.calls.borrow().clone();
    // The gate learns where to go on, both halves of the kernel's PGD map the gate's slot, and the MSR
    // gets the gate.
    assert!(calls.contains(&Call::WritePhys(
        gate.kernel_entry_slot,
        kernel_entry.to_le_bytes().to_vec()
    )));
    for half in [0, 4096] {
        assert!(calls.contains(&Call::WritePhys(
            Gpa::new(gate.pgd.raw() + half + 466 * 8),
            gate.pml4e.to_le_bytes().to_vec()
        )));
    }
    assert!(calls.contains(&Call::WriteMsr(crate::guard::IA32_LSTAR, gate.gate_entry)));
    // A read of LSTAR shows the kernel's own value.
    let mut rd = MockVcpu::exited(EXIT_RDMSR, 0x9000, 2);
    rd.regs.rcx = u64::from(crate::guard::IA32_LSTAR);
    h.handle_exit(&mut rd, &mut p);
    assert_eq!((rd.regs.rdx << 32) | rd.regs.rax, kernel_entry);
    // Moving it later is refused, as for any guarded guest.
    let mut other = wrmsr_lstar(0x1000);
    h.handle_exit(&mut other, &mut p);
    assert_eq!(other.fields[&guest::RIP], 0x8000, "refused");
}

#[test]
fn an_occupied_slot_leaves_the_kernel_s_entry_alone() {
    let (mut h, mut p, gate) = linux_guarded();
    p.write_u64(gate.pgd.raw() + 466 * 8, 0x1234_5067);
    let kernel_entry = 0xffff_ffff_8120_0080;
    h.handle_exit(&mut wrmsr_lstar(kernel_entry), &mut p);
    let calls = p.calls.borrow();
    assert!(calls.contains(&Call::WriteMsr(crate::guard::IA32_LSTAR, kernel_entry)));
    assert!(
        !calls.iter().any(|c| matches!(c, Call::WritePhys(..))),
        "nothing of the kernel's was overwritten"
    );
    assert!(calls
        .iter()
        .any(|c| matches!(c, Call::Log(s) if s.contains("slot 466") && s.contains("in use"))));
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::Log(s) if s.contains("now enter through the gate"))),
        "no claim that the gate is in front"
    );
}

const LINUX_GATE_PAGE: u64 = 0x40_0000;
/// The trampoline's 2 MiB slot: PML4 511, PDPT 510, PD 16.
const HOOK_SLOT: u64 = 0xffff_ffff_8200_0000;

/// The kernel's page tables down to the page directory of its image mapping, and the hooked
/// function's first bytes as ftrace leaves them.
fn linux_kernel_memory(p: &mut MockPlatform) {
    p.write_u64(0x50_0000 + 511 * 8, 0x51_0063);
    p.write_u64(0x51_0000 + 510 * 8, 0x52_0063);
    p.write_bytes(0x112_6cf9, &crate::linux_hooks::FENTRY_NOP);
}

/// The first system call of a Linux guest, which finds the gate closed.
fn first_syscall() -> MockVcpu {
    let mut v = MockVcpu::exited(EXIT_EPT_VIOLATION, 0xffff_e900_0000_00b1, 0);
    v.fields
        .insert(ro::GUEST_PHYSICAL_ADDR_FULL, LINUX_GATE_PAGE + 0xb1);
    v.fields.insert(ro::EXIT_QUALIFICATION, 0x84 | 0x1); // fetch; readable
    v.fields.insert(control::EPTP_FULL, GUEST_EPTP);
    v
}

#[test]
fn the_first_system_call_installs_the_exec_hook_and_opens_the_gate() {
    let (mut h, mut p, gate) = linux_guarded();
    linux_kernel_memory(&mut p);
    let mut v = first_syscall();
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert_eq!(
        v.fields[&guest::RIP],
        0xffff_e900_0000_00b1,
        "the SYSCALL runs again"
    );
    let calls = p.calls.borrow().clone();
    let hook = gate.exec_hook.unwrap();
    // The slot's page-directory entry points at the trampoline's table; the call reaches the trampoline.
    let pd_entry = Gpa::new(0x52_0000 + 16 * 8);
    assert!(calls.contains(&Call::WritePhys(
        pd_entry,
        (0x40_4000u64 | 0x23).to_le_bytes().to_vec()
    )));
    let rel = (hook.trampoline as i64 - (hook.site as i64 + 5)) as i32;
    let mut call = vec![0xe8];
    call.extend_from_slice(&rel.to_le_bytes());
    assert!(calls.contains(&Call::WritePhys(hook.site_pa, call)));
    // The page with the call is no longer writable; the gate is executable.
    assert!(calls.contains(&Call::ProtectGuest(
        Gpa::new(0x112_6000),
        4096,
        ihmi_ept::Perm::RX
    )));
    assert!(calls.contains(&Call::ProtectGuest(
        Gpa::new(LINUX_GATE_PAGE),
        4096,
        ihmi_ept::Perm::RX
    )));
    assert!(h.guard.as_ref().unwrap().armed_hook().is_some());
    // Only once: a later fetch violation on the gate is an attack, and ends the guest.
    assert!(matches!(
        h.handle_exit(&mut first_syscall(), &mut p),
        Action::End(GuestEnd::EptViolation { .. })
    ));
}

#[test]
fn a_changed_trampoline_mapping_is_noticed_at_the_next_exit() {
    let (mut h, mut p, _) = linux_guarded();
    linux_kernel_memory(&mut p);
    h.handle_exit(&mut first_syscall(), &mut p);
    // The kernel points the slot somewhere else (its own code at the trampoline's address).
    p.write_u64(0x52_0000 + 16 * 8, 0x7777_7063);
    let action = h.handle_exit(&mut MockVcpu::exited(EXIT_CPUID, 0x1000, 2), &mut p);
    assert_eq!(
        action,
        Action::End(GuestEnd::HookTampered {
            gpa: Gpa::new(0x52_0000 + 16 * 8)
        })
    );
    assert!(matches!(
        h.rec.alerts().as_slice(),
        [crate::Alert::HookTampered {
            found: 0x7777_7063,
            ..
        }]
    ));
}

#[test]
fn a_site_without_the_fentry_nop_is_left_alone_and_said_so() {
    let (mut h, mut p, gate) = linux_guarded();
    linux_kernel_memory(&mut p);
    // ftrace is tracing the function: the site holds a call already.
    p.write_bytes(0x112_6cf9, &[0xe8, 1, 2, 3, 4]);
    assert_eq!(h.handle_exit(&mut first_syscall(), &mut p), Action::Resume);
    let calls = p.calls.borrow().clone();
    assert!(
        !calls.iter().any(|c| matches!(c, Call::WritePhys(..))),
        "nothing written"
    );
    assert!(calls.iter().any(
        |c| matches!(c, Call::Log(s) if s.contains("process creation is not monitored") && s.contains("__fentry__"))
    ));
    // System calls still go through: the gate opens.
    assert!(calls.contains(&Call::ProtectGuest(
        gate.gate_page,
        4096,
        ihmi_ept::Perm::RX
    )));
    assert!(h.guard.as_ref().unwrap().armed_hook().is_none());
}

#[test]
fn an_occupied_trampoline_slot_is_refused() {
    let (mut h, mut p, _) = linux_guarded();
    linux_kernel_memory(&mut p);
    p.write_u64(0x52_0000 + 16 * 8, 0x0200_00e3); // a 2 MiB page of the kernel's
    h.handle_exit(&mut first_syscall(), &mut p);
    let calls = p.calls.borrow().clone();
    assert!(calls
        .iter()
        .any(|c| matches!(c, Call::Log(s) if s.contains("needs that 2 MiB slot free"))));
    assert!(!calls
        .iter()
        .any(|c| matches!(c, Call::WritePhys(g, _) if *g == Gpa::new(0x112_6cf9))));
}

#[test]
fn out_of_the_box_the_stub_s_vmcall_is_a_system_call_that_leaves_registers_alone() {
    let (mut h, mut p, mut gate) = linux_guarded();
    const STUB: u64 = 0xffff_e900_0000_0300;
    gate.outbox_syscall = Some(STUB);
    h.guard.as_mut().unwrap().linux_gate = Some(gate);
    h.outbox_monitor = true;
    let mut v = MockVcpu::exited(EXIT_VMCALL, STUB, 3);
    v.regs.rax = 39; // getpid, not a hypercall number
    v.regs.rdi = 1;
    v.regs.rsi = 2;
    v.regs.rdx = 3;
    let before = v.regs;
    assert_eq!(
        h.handle_exit(&mut v, &mut p),
        Action::CallMonitor {
            code: ihmi_abi::monitor::RequestCode::Syscall as u64,
            args: [39, 1, 2, 3],
            verdict_to_rax: false,
        }
    );
    assert_eq!(
        v.fields[&guest::RIP],
        STUB + 3,
        "on to the jump to the kernel"
    );
    assert_eq!(v.regs, before, "no register changed");
    // A VMCALL anywhere else is a hypercall as always.
    let mut other = MockVcpu::exited(EXIT_VMCALL, STUB + 0x40, 3);
    other.regs.rax = 39;
    h.handle_exit(&mut other, &mut p);
    assert_eq!(other.regs.rax, ihmi_abi::Status::UnknownCall.to_raw());
}

#[test]
fn bench_marks_open_and_close_windows_and_an_unpaired_end_is_refused() {
    use ihmi_abi::bench::Bench;
    let mut h = hv();
    let mut p = MockPlatform::default();
    let bench = Hypercall::Bench as u64;
    let null = Bench::InvokeNull as u64;
    // An end mark with no window open: refused like any invalid argument, and nothing measured.
    let mut v = vmcall(bench, [null, 1, 1234, 20]);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert_eq!(Status::from_raw(v.regs.rax), Some(Status::InvalidArgument));
    assert!(!h
        .rec
        .seen
        .iter()
        .any(|s| matches!(s, Seen::Other(Observation::BenchMark(_)))));
    // A start, then its end: both observed, the end with what the guest measured.
    h.handle_exit(&mut vmcall(bench, [null, 0, 0, 0]), &mut p);
    let mut v = vmcall(bench, [null, 1, 1234, 20]);
    h.handle_exit(&mut v, &mut p);
    assert_eq!(Status::from_raw(v.regs.rax), Some(Status::Ok));
    let marks: std::vec::Vec<_> = h
        .rec
        .seen
        .iter()
        .filter_map(|s| match s {
            Seen::Other(Observation::BenchMark(m)) => Some((m.end, m.tsc, m.calls, m.guest_exits)),
            _ => None,
        })
        .collect();
    assert_eq!(marks, vec![(false, 0, 0, 2), (true, 1234, 20, 3)]);
    assert_eq!(
        h.rec.hypercalls(),
        vec![
            (bench, Status::InvalidArgument),
            (bench, Status::Ok),
            (bench, Status::Ok)
        ]
    );
}
