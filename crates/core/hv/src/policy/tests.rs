//! The policy's answers: hypercalls, CPUID, MSRs, port I/O, HLT, exceptions, XSETBV, VMX instructions.

extern crate std;

use std::vec;

use ihmi_abi::{CpuidRecord, Hypercall, ReportKind, Status, PING_REPLY};
use ihmi_vmcs::fields::{control, guest, ro};
use ihmi_vmcs::ExitReason;

use crate::mock::{Call, MockPlatform, MockVcpu, Seen};
use crate::testing::*;
use crate::{Action, GuestEnd, Observation};

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
    // isa-debug-exit: the value written, whatever its size (kvm-unit-tests write a 32-bit one).
    assert_eq!(
        h.handle_exit(&mut io_out(0xf4, 0), &mut p),
        Action::End(GuestEnd::DebugExit(0))
    );
    let mut wide = MockVcpu::exited(EXIT_IO, 0x2000, 1);
    wide.fields.insert(ro::EXIT_QUALIFICATION, (0xf4 << 16) | 3); // OUT DX, EAX
    wide.regs.rax = 0xffff_ffff_0000_0102;
    assert_eq!(
        h.handle_exit(&mut wide, &mut p),
        Action::End(GuestEnd::DebugExit(0x102))
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
            entry: ihmi_abi::monitor::Entry::CallGate,
            caller_rsp: 0,
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

#[test]
fn cpuid_hides_fast_short_rep_mov() {
    let mut h = hv();
    let mut p = MockPlatform::default();
    let mut v = MockVcpu::exited(EXIT_CPUID, 0x1000, 2);
    v.regs.rax = 7;
    v.regs.rcx = 0;
    h.handle_exit(&mut v, &mut p);
    // The mock host reports FSRM (bit 4) and MD_CLEAR (bit 10) in leaf 7 EDX: only FSRM goes.
    assert_eq!(v.regs.rdx as u32, 1 << 10);
}

#[test]
fn only_the_monitor_view_may_ask_for_its_ring_to_be_drained() {
    let (mut h, mut p) = guarded();
    let nr = Hypercall::RingHighWater as u64;
    for (eptp, status) in [(GUEST_EPTP, Status::Denied), (MONITOR_EPTP, Status::Ok)] {
        let mut v = vmcall(nr, [0; 4]);
        v.fields.insert(control::EPTP_FULL, eptp);
        assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
        assert_eq!(Status::from_raw(v.regs.rax), Some(status), "{eptp:#x}");
    }
    // Without views (no in-box monitor) nobody may.
    let mut h = hv();
    let mut v = vmcall(nr, [0; 4]);
    h.handle_exit(&mut v, &mut p);
    assert_eq!(Status::from_raw(v.regs.rax), Some(Status::Denied));
}

/// The VM-exit interruption information of an NMI exit: valid, type NMI, vector 2.
const NMI_EXIT_INFO: u64 = 0x8000_0202;
const EXIT_PREEMPTION_TIMER: u32 = 52;
/// The audit period L0 loads into the VMX-preemption timer.
const AUDIT_TIMER: u64 = 1 << 24;

/// The next exit of the same vCPU, in the view `eptp`: as the CPU does at every exit, the VM-entry
/// interruption information is no longer valid.
fn next_exit(v: &mut MockVcpu, reason: u32, eptp: u64) {
    v.fields.insert(ro::EXIT_REASON, u64::from(reason));
    v.fields.insert(control::EPTP_FULL, eptp);
    let entry = v
        .fields
        .entry(control::VMENTRY_INTERRUPTION_INFO_FIELD)
        .or_default();
    *entry &= !(1 << 31);
    v.calls.clear();
}

fn nmi_exit(eptp: u64) -> MockVcpu {
    let mut v = MockVcpu::exited(EXIT_EXCEPTION, 0xffff_ffff_8100_0000, 0);
    v.fields.insert(ro::VMEXIT_INTERRUPTION_INFO, NMI_EXIT_INFO);
    v.fields.insert(control::EPTP_FULL, eptp);
    v.fields
        .insert(guest::VMX_PREEMPTION_TIMER_VALUE, AUDIT_TIMER);
    v
}

fn injected_nmi(v: &MockVcpu) -> bool {
    v.fields
        .get(&control::VMENTRY_INTERRUPTION_INFO_FIELD)
        .copied()
        == Some(u64::from(ihmi_vmcs::InterruptionInfo::nmi().raw()))
}

#[test]
fn an_nmi_in_the_guest_view_is_injected_at_once_and_l0_unblocks_nmis() {
    let (mut h, mut p) = guarded();
    let mut v = nmi_exit(GUEST_EPTP);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert!(injected_nmi(&v));
    assert!(p.calls.borrow().contains(&Call::UnblockNmis));
    assert_eq!(
        v.fields[&guest::VMX_PREEMPTION_TIMER_VALUE],
        AUDIT_TIMER,
        "no polling for an NMI delivered at once"
    );
    let counts = h.nmi_counts();
    assert_eq!(
        (counts.taken, counts.in_monitor_view, counts.delivered),
        (1, 0, 1)
    );
    assert!(h.rec.seen.contains(&Seen::Other(Observation::NmiDelivered)));
}

#[test]
fn an_nmi_in_the_monitor_view_waits_until_the_guest_is_back_in_its_own() {
    use crate::policy::nmi::NMI_POLL_TIMER;
    let (mut h, mut p) = guarded();
    let mut v = nmi_exit(MONITOR_EPTP);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert!(!injected_nmi(&v), "never delivered in the monitor's view");
    assert_eq!(v.fields[&guest::VMX_PREEMPTION_TIMER_VALUE], NMI_POLL_TIMER);
    // The timer brings the guest back while it is still in the monitor's view: it keeps waiting.
    next_exit(&mut v, EXIT_PREEMPTION_TIMER, MONITOR_EPTP);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert!(!injected_nmi(&v));
    // A second NMI meanwhile merges into the waiting one, as the CPU latches only one.
    next_exit(&mut v, EXIT_EXCEPTION, MONITOR_EPTP);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert!(!injected_nmi(&v));
    // Back in the guest's view: delivered, and the audit period is back.
    next_exit(&mut v, EXIT_PREEMPTION_TIMER, GUEST_EPTP);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert!(injected_nmi(&v));
    assert_eq!(v.fields[&guest::VMX_PREEMPTION_TIMER_VALUE], AUDIT_TIMER);
    let c = h.nmi_counts();
    assert_eq!(
        (c.taken, c.in_monitor_view, c.merged, c.delivered),
        (2, 2, 1, 1)
    );
}

#[test]
fn an_nmi_waits_while_the_guest_blocks_nmis_or_another_event_goes_in() {
    let (mut h, mut p) = guarded();
    // The guest is in its own NMI handler (virtual-NMI blocking): wait for its IRET.
    let mut v = nmi_exit(GUEST_EPTP);
    v.fields.insert(guest::INTERRUPTIBILITY_STATE, 1 << 3);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert!(!injected_nmi(&v));
    v.fields.insert(guest::INTERRUPTIBILITY_STATE, 0);
    next_exit(&mut v, EXIT_PREEMPTION_TIMER, GUEST_EPTP);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert!(injected_nmi(&v));

    // An NMI that interrupted the delivery of an interrupt: the interrupt goes in first.
    let vectoring = u64::from(ihmi_vmcs::InterruptionInfo::external_interrupt(0xec).raw());
    next_exit(&mut v, EXIT_EXCEPTION, GUEST_EPTP);
    v.fields.insert(ro::IDT_VECTORING_INFO, vectoring);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert_eq!(
        v.fields[&control::VMENTRY_INTERRUPTION_INFO_FIELD],
        vectoring
    );
    v.fields.insert(ro::IDT_VECTORING_INFO, 0);
    next_exit(&mut v, EXIT_PREEMPTION_TIMER, GUEST_EPTP);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert!(injected_nmi(&v));
    assert_eq!(h.nmi_counts().delivered, 2);
}

#[test]
fn an_nmi_l0_took_while_it_ran_goes_to_the_guest() {
    let (mut h, mut p) = guarded();
    p.host_nmi = true;
    let mut v = vmcall(Hypercall::Ping as u64, [0; 4]);
    v.fields.insert(control::EPTP_FULL, GUEST_EPTP);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert!(injected_nmi(&v));
    assert!(!p.host_nmi, "handed over once");
    assert_eq!(h.nmi_counts().taken, 1);
    // Without one, nothing is injected and nothing counted.
    let mut v = vmcall(Hypercall::Ping as u64, [0; 4]);
    v.fields.insert(control::EPTP_FULL, GUEST_EPTP);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert!(!injected_nmi(&v));
    assert_eq!((h.nmi_counts().taken, h.nmi_counts().delivered), (1, 1));
}
