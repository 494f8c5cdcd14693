//! The out-of-box baseline: the same monitor image as the kernel of a VM of its own, with its own VMCS
//! (the second of L0's VMCS arena) and its own EPT (guest RAM read-only, its frames, nothing else). A
//! guest's `Monitor` hypercall makes L0 switch to this VM with the request in registers; the
//! monitor's VMCALL with the verdict makes L0 switch back. Two VM exits and two VMCS switches per
//! call: the cost in-box monitoring avoids.

use ihmi_addr::Gpa;
use ihmi_hv::monitor_vm::MonitorVmExit;
use ihmi_hv::{ExitCounters, GuestEnd, GuestRegs, MemoryMap};
use ihmi_rt::tables::TableBases;
use ihmi_vmcs::fields::guest;
use ihmi_vmcs::{VmcsId, VmxCapabilities};
use ihmi_vmx::{HwVcpu, Vmcss};

use crate::error::LoadError;
use crate::frames::Pool;
use crate::guest::GuestBoot;
use crate::monitor::Loaded;
use crate::state::L0State;
use crate::vmcs_setup::{self, VmParams};
use crate::{dump_vmcs, log};

/// RFLAGS the monitor VM starts every request with: reserved bit 1, interrupts off.
const MONITOR_RFLAGS: u64 = ihmi_arch::rflags::RESERVED_1;

/// The monitor VM and the state of the call in progress.
#[derive(Debug)]
pub struct MonitorVm {
    /// Its VMCS.
    vmcs: VmcsId,
    entry: u64,
    stack_top: u64,
    running: bool,
    /// The guest's registers while the monitor VM runs.
    saved: GuestRegs,
    /// Whether the verdict goes back in the guest's RAX (not for a Linux system call, whose RAX is
    /// the kernel's to read).
    verdict_to_rax: bool,
    calls: u64,
    exits: ExitCounters,
}

impl MonitorVm {
    /// Whether the monitor VM is the one running (its VMCS is current).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Requests served.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Exits the monitor VM made (one per call: its verdict VMCALL).
    pub fn exits(&self) -> u64 {
        self.exits.total()
    }
}

/// Builds the monitor VM's EPT and VMCS around the loaded monitor. Its VMCS is current afterwards;
/// the caller creates the guest's next, which is then current at launch.
pub fn setup(
    m: &Loaded,
    vmcss: &mut Vmcss,
    memory: &MemoryMap,
    caps: &VmxCapabilities,
    tables: &TableBases,
    frames: &mut Pool,
) -> Result<MonitorVm, LoadError> {
    let view =
        ihmi_hv::guard::views::build_outbox_view(frames, memory, &m.layout).map_err(|error| {
            LoadError::View {
                which: "the monitor VM's EPT",
                error,
            }
        })?;
    log!(
        "monitor VM: EPT root {} (guest RAM read-only), entry {:#x}",
        view.root(),
        m.outbox_entry
    );
    let frame = frames.frame()?;
    // SAFETY: VMX is on; `frame` is a fresh, identity-mapped pool frame given to the arena for good;
    // the guest's VMCS is created (and so current) after this one, before any entry.
    let id = unsafe { vmcss.create(frame, caps) }.map_err(|error| LoadError::Vmx {
        what: "the monitor VM's VMCS",
        error,
    })?;
    // No GDT, IDT or TSS in the monitor VM: it never loads a segment, and every exception exits.
    let boot = GuestBoot {
        mode: crate::guest::EntryMode::Long,
        entry: m.outbox_entry,
        cr3: m.root,
        gdt: Gpa::new(0),
        gdt_limit: 0,
        stack_top: Gpa::new(m.stack_top),
        boot_info: Gpa::new(0),
        code_selector: 0x08,
        data_selector: 0x10,
    };
    // Every exception exits: the monitor VM has no IDT, and a fault in it is L0's to report.
    let params = VmParams {
        eptp: view.eptp(),
        eptp_list: None,
        boot: &boot,
        exceptions: u32::MAX,
        hlt_exits: true,
        audit_period: None,
        nmi_exiting: true,
    };
    if let Err(error) = vmcs_setup::configure(vmcss.active(), caps, tables, frames, &params) {
        dump_vmcs(vmcss);
        return Err(LoadError::VmcsSetup {
            which: "the monitor VM",
            error,
        });
    }
    Ok(MonitorVm {
        vmcs: id,
        entry: m.outbox_entry,
        stack_top: m.stack_top,
        running: false,
        saved: GuestRegs::default(),
        verdict_to_rax: true,
        calls: 0,
        exits: ExitCounters::default(),
    })
}

/// The guest asked for a monitor call: switch to the monitor VM with the request in the registers the
/// monitor's entry takes (RDI, RSI, RDX, RCX, R8; the guest's CR3 in R9, its per-CPU base in R10).
/// Where a monitor request came from, as L0 saw it: the entry (the VMCALL's address decides) and the
/// guest's RSP at the VMCALL, which the monitor reads the caller's frame from.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub entry: ihmi_abi::monitor::Entry,
    pub rsp: u64,
}

/// A failure to switch is L0's or the CPU's, not the guest's: the guest is stopped, reported.
pub fn enter(
    st: &mut L0State,
    regs: &mut GuestRegs,
    code: u64,
    args: [u64; 4],
    verdict_to_rax: bool,
    from: Caller,
) -> Result<(), GuestEnd> {
    let stopped = |why| GuestEnd::L0Stopped { why };
    let guest_cr3 = st.vmcss.active().read(guest::CR3);
    let percpu_base = ihmi_hv::linux::percpu_base(
        &mut HwVcpu::new(st.vmcss.active(), regs),
        &mut st.machine.platform(),
    );
    let vm = st
        .outbox
        .as_mut()
        .ok_or(stopped("a monitor call without a monitor VM"))?;
    vm.saved = *regs;
    vm.verdict_to_rax = verdict_to_rax;
    vm.calls += 1;
    // SAFETY: the monitor VM's VMCS was configured by `setup` and is used on this CPU only; `regs` is
    // rewritten below to the monitor's.
    unsafe { st.vmcss.switch_to(vm.vmcs) }
        .map_err(|_| stopped("VMPTRLD of the monitor VM failed"))?;
    vm.running = true;
    for (field, value) in [
        (guest::RIP, vm.entry),
        (guest::RSP, vm.stack_top),
        (guest::RFLAGS, MONITOR_RFLAGS),
    ] {
        st.vmcss
            .active()
            .write(field, value)
            .map_err(|_| stopped("VMWRITE to the monitor VM failed"))?;
    }
    *regs = GuestRegs {
        rdi: code,
        rsi: args[0],
        rdx: args[1],
        rcx: args[2],
        r8: args[3],
        r9: guest_cr3,
        r10: percpu_base,
        r11: from.rsp,
        r12: from.entry as u64,
        ..GuestRegs::default()
    };
    Ok(())
}

/// An exit of the monitor VM: its verdict goes back to the guest; anything else is a fault of the
/// monitor VM, which ends the guest whose request it was serving (reported and judged), never L0.
pub fn on_exit(st: &mut L0State, regs: &mut GuestRegs) -> Result<(), GuestEnd> {
    let exit = ihmi_hv::monitor_vm::decode_exit(&mut HwVcpu::new(st.vmcss.active(), regs));
    let guest = st.guest_vmcs;
    let vm = st.outbox.as_mut().ok_or(GuestEnd::L0Stopped {
        why: "a monitor VM exit without a monitor VM",
    })?;
    match exit {
        MonitorVmExit::Done { verdict } => {
            vm.exits.record(ihmi_vmcs::ExitReason::Vmcall);
            // SAFETY: the guest's VMCS was launched before any monitor call; `regs` is set to the
            // guest's saved registers below, before the stub resumes.
            unsafe { st.vmcss.switch_to(guest) }.map_err(|_| GuestEnd::L0Stopped {
                why: "VMPTRLD of the guest failed",
            })?;
            vm.running = false;
            *regs = vm.saved;
            if vm.verdict_to_rax {
                regs.rax = verdict;
            }
            crate::exit::drain_monitor(st);
            Ok(())
        }
        MonitorVmExit::Interrupted { nmi } => {
            if nmi {
                crate::platform::NMI_FOR_GUEST.store(true, core::sync::atomic::Ordering::SeqCst);
                ihmi_rt::cpu::unblock_nmis();
            }
            Ok(())
        }
        MonitorVmExit::Fault {
            reason,
            rip,
            qualification,
        } => {
            dump_vmcs(&st.vmcss);
            Err(GuestEnd::MonitorVmFault {
                reason,
                rip,
                qualification,
            })
        }
    }
}
