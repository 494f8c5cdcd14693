//! The exit-policy tests' harness: a hypervisor with a small memory map and a recorder for what it
//! reports, the exits the tests make, and a guard set up the way L0 sets one up.

extern crate std;

use ihmi_addr::{Gpa, GpaRange, Gva};
use ihmi_arch::msr::IA32_LSTAR;
use ihmi_ept::Eptp;
use ihmi_vmcs::fields::{control, guest, ro};

use crate::mock::{MockPlatform, MockVcpu, Recorder};
use crate::{Action, Hypervisor};

/// The hypervisor under test and everything it reported.
pub(crate) struct TestHv {
    pub(crate) hv: Hypervisor,
    pub(crate) rec: Recorder,
}

impl TestHv {
    pub(crate) fn handle_exit(&mut self, v: &mut MockVcpu, p: &mut MockPlatform) -> Action {
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

pub(crate) const EXIT_EXCEPTION: u32 = 0;

pub(crate) const EXIT_TRIPLE_FAULT: u32 = 2;

pub(crate) const EXIT_CPUID: u32 = 10;

pub(crate) const EXIT_HLT: u32 = 12;

pub(crate) const EXIT_RDTSC: u32 = 16;

pub(crate) const EXIT_VMCALL: u32 = 18;

pub(crate) const EXIT_IO: u32 = 30;

pub(crate) const EXIT_RDMSR: u32 = 31;

pub(crate) const EXIT_WRMSR: u32 = 32;

pub(crate) const EXIT_EPT_VIOLATION: u32 = 48;

pub(crate) use crate::mock::L0_HOLE;

pub(crate) fn hv() -> TestHv {
    TestHv {
        hv: Hypervisor::new(crate::mock::memory_with_l0_hole()),
        rec: Recorder::default(),
    }
}

/// Guest page tables at 0x1000.. mapping GVA 0..1 GiB to GPA 0..1 GiB with 2 MiB pages.
pub(crate) fn platform_with_identity_paging() -> MockPlatform {
    let mut p = MockPlatform::default();
    p.write_u64(0x1000, 0x2000 | 0x3);
    p.write_u64(0x2000, 0x3000 | 0x3);
    for i in 0..512u64 {
        p.write_u64(0x3000 + i * 8, (i << 21) | 0x83);
    }
    p
}

pub(crate) fn vmcall(nr: u64, args: [u64; 4]) -> MockVcpu {
    let mut v = MockVcpu::exited(EXIT_VMCALL, 0x10_0000, 3);
    v.regs.rax = nr;
    v.regs.rbx = args[0];
    v.regs.rcx = args[1];
    v.regs.rdx = args[2];
    v.regs.rsi = args[3];
    v
}

pub(crate) fn io_out(port: u16, byte: u8) -> MockVcpu {
    let mut v = MockVcpu::exited(EXIT_IO, 0x2000, 1);
    v.fields
        .insert(ro::EXIT_QUALIFICATION, u64::from(port) << 16); // 1 byte, OUT, DX form
    v.regs.rax = u64::from(byte);
    v
}

pub(crate) const EXIT_VMFUNC: u32 = 59;

pub(crate) const GUEST_EPTP: u64 = 0xa01e;

pub(crate) const MONITOR_EPTP: u64 = 0xb01e;

pub(crate) const HOOK_GPA: u64 = 0x20_0000;

pub(crate) const GATE: u64 = 0xf0_0000;

pub(crate) fn guarded() -> (TestHv, MockPlatform) {
    let mut h = hv();
    h.guard = Some(crate::Guard::new(
        crate::ViewEptps {
            guest: Eptp::from_raw(GUEST_EPTP),
            monitor: Some(Eptp::from_raw(MONITOR_EPTP)),
        },
        Some((Gpa::new(HOOK_GPA), GATE)),
    ));
    let mut p = MockPlatform::default();
    p.write_u64(HOOK_GPA, GATE);
    (h, p)
}

pub(crate) fn wrmsr_lstar(value: u64) -> MockVcpu {
    let mut v = MockVcpu::exited(EXIT_WRMSR, 0x8000, 2);
    v.regs.rcx = u64::from(IA32_LSTAR);
    v.regs.rax = value & 0xffff_ffff;
    v.regs.rdx = value >> 32;
    v
}

pub(crate) fn linux_guarded() -> (TestHv, MockPlatform, crate::LinuxGate) {
    let (mut h, p) = guarded();
    let gate = crate::LinuxGate {
        entries: [
            (0xffff_e900_0000_00ad, 0x40_0ff8),
            (0xffff_e900_0000_02ad, 0x40_0fe8),
            (0xffff_e900_0000_03ad, 0x40_0ff0),
        ]
        .map(|(gate, slot)| crate::linux::gate::GateEntry {
            gate: Gva::new(gate),
            kernel_slot: crate::MonitorWord::new(Gpa::new(slot)),
            outbox_vmcall: None,
        }),
        pgd: Gpa::new(0x50_0000),
        slot: 466,
        pml4e: 0x60_0023,
        pti_pgd_pair: true,
        gate_page: Gpa::new(LINUX_GATE_PAGE),
        exec_hook: Some(crate::linux::hooks::ExecHook {
            site: Gva::new(0xffff_ffff_8112_6cf9),
            site_pa: Gpa::new(0x112_6cf9),
            trampoline: Gva::new(HOOK_SLOT + 0x1d8),
            slot_va: Gva::new(HOOK_SLOT),
            table: Gpa::new(0x40_4000),
            gate_page: Gpa::new(LINUX_GATE_PAGE),
            pgd: Gpa::new(0x50_0000),
        }),
        kernel: crate::KernelImage {
            text: GpaRange::new(Gpa::new(0x100_0000), Gpa::new(0x140_2000)),
            rodata: GpaRange::new(Gpa::new(0x160_0000), Gpa::new(0x181_0000)),
            idt: GpaRange::new(Gpa::new(0x1bb_1000), Gpa::new(0x1bb_2000)),
        },
        call_vmcall: None,
        io_uring_hook: None,
        kvm_exit_hook: None,
        l2_map_hook: None,
        memslot_hook: None,
        vcpu_create_hook: None,
        vcpu_destroy_hook: None,
    };
    let guard = h.guard.unwrap();
    h.guard = Some(crate::Guard::new(guard.views, None).with_linux_gate(gate));
    (h, p, gate)
}

/// [`linux_guarded`] out of the box, with the stub of entry `entry` (`SyscallEntry` order) making its
/// VMCALL at `stub`.
pub(crate) fn outbox_linux_guarded(entry: usize, stub: u64) -> (TestHv, MockPlatform) {
    let (mut h, p, mut gate) = linux_guarded();
    gate.entries[entry].outbox_vmcall = Some(Gva::new(stub));
    let views = h.guard.unwrap().views;
    h.guard = Some(crate::Guard::new(views, None).with_linux_gate(gate));
    h.outbox_monitor = true;
    (h, p)
}

pub(crate) const LINUX_GATE_PAGE: u64 = 0x40_0000;

/// The trampoline's 2 MiB slot: PML4 511, PDPT 510, PD 16.
pub(crate) const HOOK_SLOT: u64 = 0xffff_ffff_8200_0000;

/// The kernel's page tables down to the page directory of its image mapping (with page-table
/// isolation on), and the hooked function's first bytes as ftrace leaves them.
pub(crate) fn linux_kernel_memory(p: &mut MockPlatform) {
    p.write_u64(0x50_0000 + 511 * 8, 0x51_0063);
    // Page-table isolation on: the user half maps the kernel's entry text (PML4 slot 511 too).
    p.write_u64(0x50_1000 + 511 * 8, 0x54_0063);
    p.write_u64(0x51_0000 + 510 * 8, 0x52_0063);
    p.write_bytes(0x112_6cf9, &crate::linux::hooks::FENTRY_NOP);
}

/// The kernel's WRMSR of IA32_LSTAR, which puts the gate in front; the calls it made are forgotten,
/// so a test sees only what comes after.
pub(crate) fn install_gate(h: &mut TestHv, p: &mut MockPlatform) {
    h.handle_exit(&mut wrmsr_lstar(0xffff_ffff_8120_0080), p);
    assert!(h.guard.as_ref().unwrap().linux().is_some());
    p.calls.borrow_mut().clear();
}

/// The first system call of a Linux guest, which finds the gate closed.
pub(crate) fn first_syscall() -> MockVcpu {
    let mut v = MockVcpu::exited(EXIT_EPT_VIOLATION, 0xffff_e900_0000_00b1, 0);
    v.fields
        .insert(ro::GUEST_PHYSICAL_ADDR_FULL, LINUX_GATE_PAGE + 0xb1);
    v.fields.insert(ro::EXIT_QUALIFICATION, 0x84 | 0x1); // fetch; readable
    v.fields.insert(control::EPTP_FULL, GUEST_EPTP);
    v.fields.insert(guest::CR3, LINUX_USER_CR3);
    v
}

/// A user CR3 of the Linux guest: the user half of the kernel's PGD pair, PCID 1.
pub(crate) const LINUX_USER_CR3: u64 = 0x50_1001;
