//! A Linux guest: its running task, the system-call gate, the process-creation hook, and what happens
//! when L0 cannot do one of its steps.

extern crate std;

use std::vec;

use ihmi_addr::Gpa;
use ihmi_arch::msr::IA32_LSTAR;
use ihmi_vmcs::fields::{control, guest, ro};

use crate::mock::{Call, MockVcpu, Op, Seen};
use crate::testing::*;
use crate::{Action, GuestEnd, Observation};

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
        text: [0; 2],
        rodata: [0; 2],
        data: [0; 2],
        bss: [0; 2],
        idt_table: 0,
        page_offset_base: 0,
        binprm_filename: Field::default(),
        pti_pgd_pair: false,
        io_uring: None,
        files: Default::default(),
        kvm: None,
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

#[test]
fn the_kernel_s_syscall_entry_is_redirected_through_the_gate_once() {
    let (mut h, mut p, gate) = linux_guarded();
    let kernel_entry = 0xffff_ffff_8120_0080;
    h.handle_exit(&mut wrmsr_lstar(kernel_entry), &mut p);
    let calls = p.calls.borrow().clone();
    // The gate learns where to go on, both halves of the kernel's PGD map the gate's slot, and the MSR
    // gets the gate.
    assert!(calls.contains(&Call::WriteMonitor(
        gate.entries[0].kernel_slot.gpa(),
        kernel_entry
    )));
    for half in [0, 4096] {
        assert!(calls.contains(&Call::WritePhys(
            Gpa::new(gate.pgd.raw() + half + 466 * 8),
            gate.pml4e.to_le_bytes().to_vec()
        )));
    }
    assert!(calls.contains(&Call::WriteMsr(IA32_LSTAR, gate.entries[0].gate.raw())));
    // A read of LSTAR shows the kernel's own value.
    let mut rd = MockVcpu::exited(EXIT_RDMSR, 0x9000, 2);
    rd.regs.rcx = u64::from(IA32_LSTAR);
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
    assert!(calls.contains(&Call::WriteMsr(IA32_LSTAR, kernel_entry)));
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::WritePhys(..) | Call::WriteMonitor(..))),
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

#[test]
fn the_first_system_call_installs_the_exec_hook_and_opens_the_gate() {
    let (mut h, mut p, gate) = linux_guarded();
    linux_kernel_memory(&mut p);
    install_gate(&mut h, &mut p);
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
    let rel = (hook.trampoline.raw() as i64 - (hook.site.raw() as i64 + 5)) as i32;
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
    assert!(h
        .guard
        .as_ref()
        .unwrap()
        .linux()
        .unwrap()
        .armed_hook()
        .is_some());
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
    install_gate(&mut h, &mut p);
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
    install_gate(&mut h, &mut p);
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
    assert!(h
        .guard
        .as_ref()
        .unwrap()
        .linux()
        .unwrap()
        .armed_hook()
        .is_none());
}

#[test]
fn an_occupied_trampoline_slot_is_refused() {
    let (mut h, mut p, _) = linux_guarded();
    linux_kernel_memory(&mut p);
    install_gate(&mut h, &mut p);
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
    const STUB: u64 = 0xffff_e900_0000_0300;
    let (mut h, mut p) = outbox_linux_guarded(0, STUB);
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
            entry: ihmi_abi::monitor::Entry::SyscallGate,
            caller_rsp: 0,
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

/// The kernel's entry the tests install.
const KERNEL_ENTRY: u64 = 0xffff_ffff_8120_0080;

/// Where the gate's PML4 entry goes in the kernel half and the user half of the PGD.
fn slots(gate: &crate::LinuxGate) -> [u64; 2] {
    [0, 4096].map(|half| gate.pgd.raw() + half + gate.slot * 8)
}

#[test]
fn a_gate_that_cannot_be_mapped_leaves_the_kernel_s_entry_and_nothing_behind() {
    // Each write of the installation failing in turn: the monitor word, the kernel half, the user
    // half. Whatever went in before the failure is taken out, and LSTAR gets the kernel's entry.
    for (op, n) in [
        (Op::WriteMonitor, 1),
        (Op::WriteGuest, 1),
        (Op::WriteGuest, 2),
    ] {
        let (mut h, mut p, gate) = linux_guarded();
        p.fail_on(op, n);
        let mut v = wrmsr_lstar(KERNEL_ENTRY);
        assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume, "{op:?} {n}");
        assert!(p
            .calls
            .borrow()
            .contains(&Call::WriteMsr(IA32_LSTAR, KERNEL_ENTRY)));
        for at in slots(&gate) {
            assert_eq!(
                p.read_u64(at),
                0,
                "{op:?} {n}: the PGD slot at {at:#x} is empty"
            );
        }
        assert!(p
            .logs()
            .iter()
            .any(|l| l.contains("could not install the system-call gate")));
        // Nothing is audited that did not go in, and the first fetch of the closed gate is no system
        // call of a gate that never went in: it ends the guest as the EPT violation it is.
        assert_eq!(
            h.handle_exit(&mut MockVcpu::exited(EXIT_CPUID, 0x1000, 2), &mut p),
            Action::Resume
        );
        assert!(matches!(
            h.handle_exit(&mut first_syscall(), &mut p),
            Action::End(GuestEnd::EptViolation { .. })
        ));
    }
}

#[test]
fn an_unreadable_pgd_slot_is_said_so_and_leaves_the_kernel_s_entry() {
    let (mut h, mut p, _) = linux_guarded();
    p.fail_on(Op::ReadGuest, 2); // the user half
    h.handle_exit(&mut wrmsr_lstar(KERNEL_ENTRY), &mut p);
    assert!(p
        .calls
        .borrow()
        .contains(&Call::WriteMsr(IA32_LSTAR, KERNEL_ENTRY)));
    assert!(p
        .logs()
        .iter()
        .any(|l| l.contains("slot 466") && l.contains("cannot be read")));
    assert!(p.changes().is_empty(), "nothing written");
}

#[test]
fn a_hook_that_cannot_go_in_leaves_nothing_behind_and_the_gate_opens() {
    // Each read and write of the hook's installation failing in turn: the site's bytes, the walk to
    // the page directory (two levels), the slot's entry; the entry's write, the call's write. (The
    // exit's first two reads are the audit's, of the gate's PML4 entries.)
    for (op, n) in [
        (Op::ReadGuest, 3),
        (Op::ReadGuest, 4),
        (Op::ReadGuest, 5),
        (Op::ReadGuest, 6),
        (Op::WriteGuest, 1),
        (Op::WriteGuest, 2),
    ] {
        let (mut h, mut p, gate) = linux_guarded();
        linux_kernel_memory(&mut p);
        install_gate(&mut h, &mut p);
        p.fail_on(op, n);
        assert_eq!(
            h.handle_exit(&mut first_syscall(), &mut p),
            Action::Resume,
            "{op:?} {n}"
        );
        let linux = *h.guard.as_ref().unwrap().linux().unwrap();
        assert!(linux.armed_hook().is_none(), "{op:?} {n}");
        assert!(linux.is_open(), "system calls still go through the gate");
        assert_eq!(
            p.read_u64(0x52_0000 + 16 * 8),
            0,
            "{op:?} {n}: slot entry empty"
        );
        let mut site = [0u8; 5];
        site.copy_from_slice(&p.read_u64(0x112_6cf9).to_le_bytes()[..5]);
        assert_eq!(
            site,
            crate::linux::hooks::FENTRY_NOP,
            "{op:?} {n}: the NOP is intact"
        );
        assert!(p
            .logs()
            .iter()
            .any(|l| l.contains("process creation is not monitored")));
        assert!(p.changes().contains(&Call::ProtectGuest(
            gate.gate_page,
            4096,
            ihmi_ept::Perm::RX
        )));
    }
}

#[test]
fn a_hook_whose_page_cannot_be_protected_is_taken_out_again() {
    let (mut h, mut p, gate) = linux_guarded();
    linux_kernel_memory(&mut p);
    install_gate(&mut h, &mut p);
    p.fail_on(Op::ProtectGuest, 1); // the page of the hook's call
    assert_eq!(h.handle_exit(&mut first_syscall(), &mut p), Action::Resume);
    let linux = *h.guard.as_ref().unwrap().linux().unwrap();
    assert!(linux.armed_hook().is_none());
    assert!(linux.is_open());
    let mut site = [0u8; 5];
    site.copy_from_slice(&p.read_u64(0x112_6cf9).to_le_bytes()[..5]);
    assert_eq!(site, crate::linux::hooks::FENTRY_NOP, "the NOP is back");
    assert_eq!(p.read_u64(0x52_0000 + 16 * 8), 0, "the slot is empty again");
    assert!(p
        .logs()
        .iter()
        .any(|l| l.contains("cannot be write-protected")));
    assert!(p.changes().contains(&Call::ProtectGuest(
        gate.gate_page,
        4096,
        ihmi_ept::Perm::RX
    )));
    // ... and if it cannot be taken out either, the guest stops: an unprotected hook is not run.
    let (mut h, mut p, _) = linux_guarded();
    linux_kernel_memory(&mut p);
    install_gate(&mut h, &mut p);
    p.fail_on(Op::ProtectGuest, 1);
    p.fail_on(Op::WriteGuest, 3); // the NOP going back
    assert!(matches!(
        h.handle_exit(&mut first_syscall(), &mut p),
        Action::End(GuestEnd::GuardFailed { .. })
    ));
    assert!(!h.guard.as_ref().unwrap().linux().unwrap().is_open());
}

#[test]
fn a_gate_that_cannot_be_opened_stops_the_guest_and_stays_closed() {
    let (mut h, mut p, _) = linux_guarded();
    linux_kernel_memory(&mut p);
    install_gate(&mut h, &mut p);
    // The hook's call page, then the seven locked ranges, then the gate page.
    p.fail_on(Op::ProtectGuest, 9);
    let end = h.handle_exit(&mut first_syscall(), &mut p);
    assert!(
        matches!(end, Action::End(GuestEnd::GuardFailed { what, .. }) if what.contains("system-call gate")),
        "{end:?}"
    );
    let linux = *h.guard.as_ref().unwrap().linux().unwrap();
    assert!(
        !linux.is_open(),
        "a failure to protect never leaves a gate open"
    );
    assert!(
        linux.armed_hook().is_none(),
        "and the hook that would call it is out"
    );
    let mut site = [0u8; 5];
    site.copy_from_slice(&p.read_u64(0x112_6cf9).to_le_bytes()[..5]);
    assert_eq!(site, crate::linux::hooks::FENTRY_NOP);
    assert!(matches!(
        h.rec.seen.last(),
        Some(Seen::Other(Observation::Ended {
            end: GuestEnd::GuardFailed { .. },
            ..
        }))
    ));
}

#[test]
fn the_open_gate_locks_the_kernel_image_and_the_page_tables_on_its_path() {
    use ihmi_ept::Perm;
    let (mut h, mut p, gate) = linux_guarded();
    linux_kernel_memory(&mut p);
    install_gate(&mut h, &mut p);
    assert_eq!(h.handle_exit(&mut first_syscall(), &mut p), Action::Resume);
    let k = gate.kernel;
    let protected = p.changes();
    for (at, len, perm) in [
        (k.text.start, k.text.len(), Perm::RX),
        (k.rodata.start, k.rodata.len(), Perm::RX), // the vDSO runs from it
        (k.idt.start, 4096, Perm::READ),
        // Both halves of the PGD pair (the gate's slot), the trampoline's PDPT and page directory.
        (Gpa::new(0x50_0000), 4096, Perm::READ),
        (Gpa::new(0x50_1000), 4096, Perm::READ),
        (Gpa::new(0x51_0000), 4096, Perm::READ),
        (Gpa::new(0x52_0000), 4096, Perm::READ),
    ] {
        assert!(
            protected.contains(&Call::ProtectGuest(at, len, perm)),
            "{at} {perm:?}"
        );
    }
    let linux = *h.guard.as_ref().unwrap().linux().unwrap();
    assert_eq!(
        linux.locked_at(Gpa::new(0x112_6cf9)),
        Some(crate::Locked::KernelText)
    );
    assert_eq!(
        linux.locked_at(Gpa::new(0x50_1000 + 466 * 8)),
        Some(crate::Locked::GatePath)
    );
    assert_eq!(
        linux.locked_at(Gpa::new(0x150_0000)),
        None,
        "the text/rodata gap the kernel freed"
    );

    // A write to a locked page (here the PTI user half of the PGD, the gate's slot) is refused by
    // the view; L0 says what it was and stops the guest.
    let mut v = MockVcpu::exited(EXIT_EPT_VIOLATION, 0xffff_ffff_8110_0000, 0);
    v.fields
        .insert(ro::GUEST_PHYSICAL_ADDR_FULL, 0x50_1000 + 466 * 8);
    v.fields.insert(ro::EXIT_QUALIFICATION, 0x2 | 0x1 << 3); // write; readable
    v.fields.insert(control::EPTP_FULL, GUEST_EPTP);
    v.fields.insert(guest::CR3, LINUX_USER_CR3);
    assert!(matches!(
        h.handle_exit(&mut v, &mut p),
        Action::End(GuestEnd::EptViolation { .. })
    ));
    assert!(matches!(
        h.rec.alerts().as_slice(),
        [crate::Alert::LockedWrite {
            what: crate::Locked::GatePath,
            ..
        }]
    ));
}

#[test]
fn a_kernel_that_cannot_be_locked_stops_with_the_gate_closed_and_the_hook_out() {
    let (mut h, mut p, _) = linux_guarded();
    linux_kernel_memory(&mut p);
    install_gate(&mut h, &mut p);
    p.fail_on(Op::ProtectGuest, 2); // the kernel's text
    let end = h.handle_exit(&mut first_syscall(), &mut p);
    assert!(
        matches!(end, Action::End(GuestEnd::GuardFailed { what, .. }) if what.contains("kernel's code")),
        "{end:?}"
    );
    let linux = *h.guard.as_ref().unwrap().linux().unwrap();
    assert!(!linux.is_open() && linux.armed_hook().is_none());
    let mut site = [0u8; 5];
    site.copy_from_slice(&p.read_u64(0x112_6cf9).to_le_bytes()[..5]);
    assert_eq!(site, crate::linux::hooks::FENTRY_NOP);
}

#[test]
fn a_process_pgd_whose_gate_slot_was_changed_is_noticed_at_its_next_exit() {
    let (mut h, mut p, gate) = linux_guarded();
    linux_kernel_memory(&mut p);
    install_gate(&mut h, &mut p);
    h.handle_exit(&mut first_syscall(), &mut p);
    // A process's PGD pair at 0x70_0000, as pgd_alloc copies it: the gate's slot in both halves, the
    // user half's pointing elsewhere (a copy of the gate that skips the monitor).
    p.write_u64(0x70_0000 + 466 * 8, gate.pml4e);
    p.write_u64(0x70_1000 + 466 * 8, 0x7777_7023);
    let exit_on = |cr3: u64, eptp: u64| {
        let mut v = MockVcpu::exited(EXIT_CPUID, 0x1000, 2);
        v.fields.insert(guest::CR3, cr3);
        v.fields.insert(control::EPTP_FULL, eptp);
        v
    };
    // Another process, or the monitor's own address space inside the gate: nothing to see.
    assert_eq!(
        h.handle_exit(&mut exit_on(LINUX_USER_CR3, GUEST_EPTP), &mut p),
        Action::Resume
    );
    assert_eq!(
        h.handle_exit(&mut exit_on(0x70_1002, MONITOR_EPTP), &mut p),
        Action::Resume
    );
    // The tampered process running in its own view, on its user or its kernel CR3.
    for cr3 in [0x70_1002, 0x70_0002] {
        assert_eq!(
            h.handle_exit(&mut exit_on(cr3, GUEST_EPTP), &mut p),
            Action::End(GuestEnd::HookTampered {
                gpa: Gpa::new(0x70_1000 + 466 * 8)
            })
        );
    }
}

/// WRMSR of `msr` with `value`.
fn wrmsr(msr: u32, value: u64) -> MockVcpu {
    let mut v = wrmsr_lstar(value);
    v.regs.rcx = u64::from(msr);
    v
}

#[test]
fn sysenter_goes_through_its_gate_entry_and_is_locked_like_lstar() {
    use ihmi_arch::msr::IA32_SYSENTER_EIP;
    let (mut h, mut p, gate) = linux_guarded();
    install_gate(&mut h, &mut p);
    let kernel_sysenter = 0xffff_ffff_81c0_18f0;
    let mut v = wrmsr(IA32_SYSENTER_EIP, kernel_sysenter);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    // The VMCS's guest SYSENTER_EIP is the gate's entry; the gate page keeps the kernel's.
    assert_eq!(
        v.fields[&guest::IA32_SYSENTER_EIP],
        gate.entries[1].gate.raw()
    );
    assert_eq!(
        p.read_u64(gate.entries[1].kernel_slot.gpa().raw()),
        kernel_sysenter
    );
    let mut rd = MockVcpu::exited(EXIT_RDMSR, 0x9000, 2);
    rd.regs.rcx = u64::from(IA32_SYSENTER_EIP);
    rd.fields
        .insert(guest::IA32_SYSENTER_EIP, gate.entries[1].gate.raw());
    h.handle_exit(&mut rd, &mut p);
    assert_eq!(
        (rd.regs.rdx << 32) | rd.regs.rax,
        kernel_sysenter,
        "reads show the kernel's"
    );
    // Moving it later is refused with #GP and an alert naming the MSR.
    let mut moved = wrmsr(IA32_SYSENTER_EIP, 0x1000);
    h.handle_exit(&mut moved, &mut p);
    assert_eq!(
        moved.fields[&control::VMENTRY_INTERRUPTION_INFO_FIELD],
        0x8000_0b0d,
        "#GP(0)"
    );
    assert!(matches!(
        h.rec.alerts().as_slice(),
        [crate::Alert::EntryMsrWriteRefused {
            msr: IA32_SYSENTER_EIP,
            value: 0x1000,
            ..
        }]
    ));
}

#[test]
fn without_the_syscall_gate_sysenter_keeps_the_kernel_s_entry_and_cstar_is_locked_anyway() {
    use ihmi_arch::msr::{IA32_CSTAR, IA32_SYSENTER_EIP};
    let (mut h, mut p, _) = linux_guarded();
    // No LSTAR write yet, so no gate mapping: SYSENTER stays the kernel's, said on the console.
    let mut v = wrmsr(IA32_SYSENTER_EIP, 0xffff_ffff_81c0_18f0);
    h.handle_exit(&mut v, &mut p);
    assert_eq!(v.fields[&guest::IA32_SYSENTER_EIP], 0xffff_ffff_81c0_18f0);
    assert!(p
        .logs()
        .iter()
        .any(|l| l.contains("SYSENTER calls are not monitored")));
    // CSTAR: installed as given, then locked.
    h.handle_exit(&mut wrmsr(IA32_CSTAR, 0xffff_ffff_81c0_19b0), &mut p);
    assert!(p
        .calls
        .borrow()
        .contains(&Call::WriteMsr(IA32_CSTAR, 0xffff_ffff_81c0_19b0)));
    let mut moved = wrmsr(IA32_CSTAR, 0xffff_ffff_8100_0000);
    h.handle_exit(&mut moved, &mut p);
    assert_eq!(
        moved.fields[&control::VMENTRY_INTERRUPTION_INFO_FIELD],
        0x8000_0b0d
    );
    assert!(matches!(
        h.rec.alerts().last(),
        Some(crate::Alert::EntryMsrWriteRefused {
            msr: IA32_CSTAR,
            ..
        })
    ));
}

#[test]
fn the_open_gate_takes_over_int_0x80_in_the_idt_and_keeps_the_kernel_s_handler() {
    let (mut h, mut p, gate) = linux_guarded();
    linux_kernel_memory(&mut p);
    // The kernel's IDT entry 0x80: a present DPL-3 interrupt gate to 0xffffffff81c00c10, selector 0x10.
    let handler: u64 = 0xffff_ffff_81c0_0c10;
    let at = gate.kernel.idt.start.raw() + 0x80 * 16;
    let mut d = [0u8; 16];
    d[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    d[2..4].copy_from_slice(&0x10u16.to_le_bytes());
    d[5] = 0xee;
    d[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    d[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    p.write_bytes(at, &d);
    install_gate(&mut h, &mut p);
    assert_eq!(h.handle_exit(&mut first_syscall(), &mut p), Action::Resume);
    assert_eq!(p.read_u64(gate.entries[2].kernel_slot.gpa().raw()), handler);
    let lo = p.read_u64(at);
    let hi = p.read_u64(at + 8);
    let offset = (lo & 0xffff) | ((lo >> 48) << 16) | ((hi & 0xffff_ffff) << 32);
    assert_eq!(offset, gate.entries[2].gate.raw());
    assert_eq!(
        (lo >> 16) & 0xffff_ffff,
        (0x10 | 0xee << 24),
        "selector, IST, type and DPL kept"
    );
}

#[test]
fn out_of_the_box_a_32_bit_stub_s_vmcall_is_a_compat_system_call() {
    const STUB: u64 = 0xffff_e900_0000_0320;
    let (mut h, mut p) = outbox_linux_guarded(2, STUB);
    let mut v = MockVcpu::exited(EXIT_VMCALL, STUB, 3);
    v.regs.rax = 0xdead_0000_0014; // getpid in the i386 table, with junk above 32 bits
    v.regs.rbx = 1;
    v.regs.rcx = 2;
    v.regs.rdx = 3;
    assert_eq!(
        h.handle_exit(&mut v, &mut p),
        Action::CallMonitor {
            code: ihmi_abi::monitor::RequestCode::SyscallInt80 as u64,
            args: [0x14, 1, 2, 3],
            verdict_to_rax: false,
            entry: ihmi_abi::monitor::Entry::SyscallGate,
            caller_rsp: 0,
        }
    );
}

#[test]
fn out_of_the_box_a_monitor_call_is_verified_only_from_the_call_stub() {
    use ihmi_abi::monitor::{Entry, RequestCode};
    const CALL_VMCALL: u64 = 0xffff_e900_0000_0400;
    let (mut h, mut p) = outbox_linux_guarded(0, 0xffff_e900_0000_0300);
    let mut call = |h: &mut TestHv, rip: u64| {
        let mut v = MockVcpu::exited(EXIT_VMCALL, rip, 3);
        v.fields.insert(guest::RSP, 0xffff_c900_0001_3e58);
        v.fields.insert(control::EPTP_FULL, GUEST_EPTP);
        v.fields.insert(guest::CR3, LINUX_USER_CR3);
        v.regs.rax = ihmi_abi::Hypercall::Monitor as u64;
        v.regs.rbx = RequestCode::Exec as u64;
        v.regs.rcx = 0xffff_8880_0123_4000;
        match h.handle_exit(&mut v, &mut p) {
            Action::CallMonitor {
                entry, caller_rsp, ..
            } => (entry, caller_rsp),
            other => panic!("{other:?}"),
        }
    };
    // The gate's call stub is not set in this guard: every call is unverified.
    assert_eq!(call(&mut h, CALL_VMCALL).0, Entry::Unverified);
    let mut gate = *h.guard.as_ref().unwrap().linux().unwrap().gate();
    gate.call_vmcall = Some(ihmi_addr::Gva::new(CALL_VMCALL));
    let views = h.guard.unwrap().views;
    h.guard = Some(crate::Guard::new(views, None).with_linux_gate(gate));
    assert_eq!(
        call(&mut h, CALL_VMCALL),
        (Entry::CallGate, 0xffff_c900_0001_3e58)
    );
    assert_eq!(call(&mut h, CALL_VMCALL + 0x10).0, Entry::Unverified);
}

#[test]
fn with_page_table_isolation_off_at_run_time_the_empty_user_halves_are_not_audited() {
    let (mut h, mut p, gate) = linux_guarded();
    linux_kernel_memory(&mut p);
    // The CPU is not vulnerable: the kernel leaves init_top_pgt's user half empty (but for the slot
    // L0 writes) and never switches to user halves.
    p.write_u64(0x50_1000 + 511 * 8, 0);
    install_gate(&mut h, &mut p);
    let mut first = first_syscall();
    first.fields.insert(guest::CR3, 0x50_0000);
    h.handle_exit(&mut first, &mut p);
    // A process PGD pair as pgd_alloc makes it then: the kernel half has the slot, the user half is
    // empty.
    p.write_u64(0x70_0000 + 466 * 8, gate.pml4e);
    let exit_on = |cr3: u64| {
        let mut v = MockVcpu::exited(EXIT_CPUID, 0x1000, 2);
        v.fields.insert(guest::CR3, cr3);
        v.fields.insert(control::EPTP_FULL, GUEST_EPTP);
        v
    };
    assert_eq!(
        h.handle_exit(&mut exit_on(0x70_0000), &mut p),
        Action::Resume
    );
    // Its kernel half is still audited.
    p.write_u64(0x70_0000 + 466 * 8, 0x7777_7023);
    assert_eq!(
        h.handle_exit(&mut exit_on(0x70_0000), &mut p),
        Action::End(GuestEnd::HookTampered {
            gpa: Gpa::new(0x70_0000 + 466 * 8)
        })
    );
    // With isolation on (the user half maps the entry text), user halves count too.
    let (mut h, mut p, gate) = linux_guarded();
    linux_kernel_memory(&mut p);
    install_gate(&mut h, &mut p);
    h.handle_exit(&mut first_syscall(), &mut p);
    p.write_u64(0x70_0000 + 466 * 8, gate.pml4e);
    assert_eq!(
        h.handle_exit(&mut exit_on(0x70_0000), &mut p),
        Action::End(GuestEnd::HookTampered {
            gpa: Gpa::new(0x70_1000 + 466 * 8)
        })
    );
}

const EXIT_CR_ACCESS: u32 = 28;

/// A MOV to CR`cr` from RAX holding `value`.
fn mov_to_cr(cr: u64, value: u64) -> MockVcpu {
    let mut v = MockVcpu::exited(EXIT_CR_ACCESS, 0xffff_ffff_8100_1234, 3);
    v.fields.insert(ro::EXIT_QUALIFICATION, cr); // MOV to CR, from RAX (register 0)
    v.fields.insert(guest::CR3, LINUX_USER_CR3);
    v.fields.insert(control::EPTP_FULL, GUEST_EPTP);
    v.regs.rax = value;
    v
}

/// The gate opened with the kernel's CR0 and CR4 as Linux leaves them: WP, SMEP and SMAP set.
fn opened_with_pins() -> (TestHv, crate::mock::MockPlatform) {
    use ihmi_arch::cr::{CR0_WP, CR4_SMAP, CR4_SMEP};
    let (mut h, mut p, _) = linux_guarded();
    linux_kernel_memory(&mut p);
    install_gate(&mut h, &mut p);
    let mut v = first_syscall();
    v.fields.insert(guest::CR0, 0x8005_0033);
    v.fields
        .insert(guest::CR4, 0x0000_06f0 | CR4_SMEP | CR4_SMAP);
    v.fields.insert(control::CR4_READ_SHADOW, 0x20);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert_eq!(v.fields[&control::CR0_GUEST_HOST_MASK], CR0_WP);
    assert_eq!(v.fields[&control::CR0_READ_SHADOW] & CR0_WP, CR0_WP);
    assert_eq!(
        v.fields[&control::CR4_GUEST_HOST_MASK],
        ihmi_arch::cr::CR4_VMXE | CR4_SMEP | CR4_SMAP
    );
    assert_eq!(
        v.fields[&control::CR4_READ_SHADOW],
        0x20 | CR4_SMEP | CR4_SMAP,
        "the guest reads its bits as it set them; VMXE stays hidden"
    );
    let pins = h.guard.as_ref().unwrap().pins();
    assert_eq!((pins.cr0, pins.cr4), (CR0_WP, CR4_SMEP | CR4_SMAP));
    (h, p)
}

#[test]
fn opening_the_gate_pins_wp_smep_and_smap_and_clearing_one_is_refused() {
    use ihmi_arch::cr::{CR0_WP, CR4_SMAP};
    let (mut h, mut p) = opened_with_pins();
    for (cr, value, cleared) in [
        (0, 0x8005_0033 & !CR0_WP, CR0_WP),
        (4, 0x0000_06f0 | ihmi_arch::cr::CR4_SMEP, CR4_SMAP),
    ] {
        let mut v = mov_to_cr(cr, value);
        assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
        assert_eq!(
            v.fields[&control::VMENTRY_INTERRUPTION_INFO_FIELD],
            u64::from(ihmi_vmcs::InterruptionInfo::hardware_exception(13, true).raw()),
            "#GP, and the write does not happen"
        );
        assert_eq!(v.fields[&guest::RIP], 0xffff_ffff_8100_1234, "not skipped");
        assert!(!v
            .writes()
            .iter()
            .any(|(f, _)| *f == guest::CR0 || *f == guest::CR4));
        assert_eq!(
            h.rec.alerts().last(),
            Some(&crate::Alert::CrPinRefused {
                cr: cr as u8,
                value,
                cleared,
                rip: 0xffff_ffff_8100_1234,
            })
        );
    }
}

#[test]
fn setting_cr4_vmxe_without_vmx_gets_gp_and_no_alert_and_other_cr_exits_end_the_guest() {
    let (mut h, mut p) = opened_with_pins();
    let alerts = |h: &TestHv| h.rec.alerts().len();
    let before = alerts(&h);
    let mut v = mov_to_cr(
        4,
        0x0000_26f0 | ihmi_arch::cr::CR4_SMEP | ihmi_arch::cr::CR4_SMAP,
    );
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    assert_eq!(
        v.fields[&control::VMENTRY_INTERRUPTION_INFO_FIELD],
        u64::from(ihmi_vmcs::InterruptionInfo::hardware_exception(13, true).raw())
    );
    assert_eq!(alerts(&h), before);
    // A MOV to CR3 never exits (no CR3 exiting): if one did, it is no exit L0 asked for.
    let mut v = mov_to_cr(3, 0x1000);
    assert!(matches!(
        h.handle_exit(&mut v, &mut p),
        Action::End(GuestEnd::Unhandled { .. })
    ));
}

#[test]
fn the_io_uring_hook_goes_in_through_the_same_slot_or_is_left_out_with_a_message() {
    use crate::linux::hooks::{HookSite, FENTRY_NOP};
    use ihmi_addr::Gva;
    const SITE: u64 = 0xffff_ffff_8116_0f20;
    const SITE_PA: u64 = 0x116_0f20;
    let trampoline = HOOK_SLOT + 0x260;
    for nop in [true, false] {
        let (mut h, mut p, mut gate) = linux_guarded();
        gate.io_uring_hook = Some(HookSite {
            site: Gva::new(SITE),
            site_pa: Gpa::new(SITE_PA),
            trampoline: Gva::new(trampoline),
        });
        let views = h.guard.unwrap().views;
        h.guard = Some(crate::Guard::new(views, None).with_linux_gate(gate));
        linux_kernel_memory(&mut p);
        if nop {
            p.write_bytes(SITE_PA, &FENTRY_NOP);
        }
        install_gate(&mut h, &mut p);
        assert_eq!(h.handle_exit(&mut first_syscall(), &mut p), Action::Resume);
        let linux = h.guard.as_ref().unwrap().linux().unwrap();
        assert!(linux.is_open() && linux.armed_hook().is_some());
        let calls = p.calls.borrow().clone();
        if nop {
            let rel = (trampoline as i64 - (SITE as i64 + 5)) as i32;
            let mut call = vec![0xe8];
            call.extend_from_slice(&rel.to_le_bytes());
            assert!(calls.contains(&Call::WritePhys(Gpa::new(SITE_PA), call)));
            assert!(calls.contains(&Call::ProtectGuest(
                Gpa::new(0x116_0000),
                4096,
                ihmi_ept::Perm::RX
            )));
            assert!(linux.armed_io_uring().is_some());
        } else {
            assert!(linux.armed_io_uring().is_none());
            assert!(!calls
                .iter()
                .any(|c| matches!(c, Call::WritePhys(at, _) if *at == Gpa::new(SITE_PA))));
            assert!(p
                .logs()
                .iter()
                .any(|l| l.contains("io_uring is not monitored")));
        }
    }
}

/// The IDTR base the boot left is held (P5, in part): an exit that finds another (an LIDT of the
/// kernel's, which does not exit) is an `idt-moved` alert with the boot's IDTR written back; an
/// exit that finds the boot's base with the limit a VM exit leaves (0xFFFF) is quiet.
#[test]
fn an_idt_moved_after_the_boot_is_put_back_at_the_next_exit() {
    const IDT: u64 = 0xffff_fe00_0000_0000;
    const ELSEWHERE: u64 = 0xffff_8880_01dd_c000;
    let (mut h, mut p, _) = linux_guarded();
    linux_kernel_memory(&mut p);
    install_gate(&mut h, &mut p);
    let mut v = first_syscall();
    v.fields.insert(guest::IDTR_BASE, IDT);
    v.fields.insert(guest::IDTR_LIMIT, 0xfff);
    assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
    let cpuid = |base: u64, limit: u64| {
        let mut c = MockVcpu::exited(10, 0xffff_ffff_8100_2000, 2);
        c.fields.insert(control::EPTP_FULL, GUEST_EPTP);
        c.fields.insert(guest::CR3, LINUX_USER_CR3);
        c.fields.insert(guest::IDTR_BASE, base);
        c.fields.insert(guest::IDTR_LIMIT, limit);
        c
    };
    let before = h.rec.alerts().len();
    let mut c = cpuid(IDT, 0xffff);
    assert_eq!(h.handle_exit(&mut c, &mut p), Action::Resume);
    assert_eq!(h.rec.alerts().len(), before);
    assert!(!c.writes().iter().any(|(f, _)| *f == guest::IDTR_BASE));
    let mut c = cpuid(ELSEWHERE, 0x7f);
    assert_eq!(h.handle_exit(&mut c, &mut p), Action::Resume);
    assert_eq!(
        h.rec.alerts().last(),
        Some(&crate::Alert::IdtMoved {
            found: ELSEWHERE,
            expected: IDT,
            rip: 0xffff_ffff_8100_2000,
        })
    );
    assert_eq!(
        (c.fields[&guest::IDTR_BASE], c.fields[&guest::IDTR_LIMIT]),
        (IDT, 0xfff)
    );
    let json = std::format!("{}", h.rec.alerts().last().unwrap());
    assert!(
        json.contains("\"alert\":\"idt-moved\"") && json.contains("\"action\":\"restored\""),
        "{json}"
    );
}
