//! The out-of-box baseline: the same monitor image as the kernel of a VM of its own, with its own VMCS
//! and its own EPT (guest RAM read-only, its frames, nothing else). A guest's `Monitor` hypercall
//! makes L0 switch to this VM with the request in registers; the monitor's VMCALL with the verdict
//! makes L0 switch back. Two VM exits and two VMCS switches per call: the cost in-box monitoring
//! avoids.

use ihmi_addr::{Gpa, Hpa};
use ihmi_hv::{ExitCounters, GuestRegs, MemoryMap};
use ihmi_rt::tables::TableBases;
use ihmi_vmcs::fields::guest;
use ihmi_vmcs::VmxCapabilities;
use ihmi_vmx::HwVcpu;

use crate::frames::Pool;
use crate::guest::GuestBoot;
use crate::monitor::Loaded;
use crate::{dump_vmcs, fail, log, vmcs_setup, L0State};

/// RFLAGS the monitor VM starts every request with: reserved bit 1, interrupts off.
const MONITOR_RFLAGS: u64 = 0x2;

/// The monitor VM and the state of the call in progress.
#[derive(Debug)]
pub struct MonitorVm {
    vmcs: Hpa,
    guest_vmcs: Hpa,
    entry: u64,
    stack_top: u64,
    launched: bool,
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
    /// Remembers the guest's VMCS, to switch back to.
    pub fn with_guest_vmcs(self, guest_vmcs: Hpa) -> Self {
        Self { guest_vmcs, ..self }
    }

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

/// Builds the monitor VM's EPT and VMCS around the loaded monitor. Leaves no VMCS current that the
/// caller relies on: it loads the guest's next.
pub fn setup(
    m: &Loaded,
    memory: &MemoryMap,
    caps: &VmxCapabilities,
    tables: &TableBases,
    frames: &mut Pool,
) -> MonitorVm {
    let view = ihmi_hv::guard::views::build_outbox_view(frames, memory, &m.layout)
        .unwrap_or_else(|e| fail(format_args!("monitor VM EPT: {e}")));
    log!(
        "monitor VM: EPT root {} (guest RAM read-only), entry {:#x}",
        view.root(),
        m.outbox_entry
    );
    let frame = frames.alloc_zeroed();
    // SAFETY: VMX is on; `frame` is a fresh pool frame used for nothing else.
    let mut vmcs = match unsafe { ihmi_vmx::load_vmcs(frame, caps) } {
        Ok(v) => v,
        Err(e) => fail(format_args!("monitor VM: {e}")),
    };
    // No GDT, IDT or TSS in the monitor VM: it never loads a segment, and every exception exits.
    let boot = GuestBoot {
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
    let params = vmcs_setup::VmParams {
        eptp: view.eptp(),
        eptp_list: None,
        boot: &boot,
        exceptions: u32::MAX,
        hlt_exits: true,
    };
    if let Err(e) = vmcs_setup::configure(&mut vmcs, caps, tables, frames, &params) {
        log!("monitor VM VMCS setup failed: {e}");
        dump_vmcs(&vmcs);
        fail(format_args!("monitor VM VMCS setup failed: {e}"));
    }
    MonitorVm {
        vmcs: frame,
        guest_vmcs: Hpa::new(0),
        entry: m.outbox_entry,
        stack_top: m.stack_top,
        launched: false,
        running: false,
        saved: GuestRegs::default(),
        verdict_to_rax: true,
        calls: 0,
        exits: ExitCounters::default(),
    }
}

/// The guest asked for a monitor call: switch to the monitor VM with the request in the registers the
/// monitor's entry takes (RDI, RSI, RDX, RCX, R8; the guest's CR3 in R9).
pub fn enter(
    st: &mut L0State,
    regs: &mut GuestRegs,
    code: u64,
    args: [u64; 4],
    verdict_to_rax: bool,
) {
    let guest_cr3 = st.vmcs.read(guest::CR3);
    let percpu_base = ihmi_hv::linux::percpu_base(
        &mut HwVcpu::new(&mut st.vmcs, regs),
        &mut crate::HwPlatform {
            guest_view: &mut st.guest_view,
            frames: &mut st.frames,
            fence: &st.fence,
            monitor_word: st.monitor_word,
        },
    );
    let Some(vm) = st.outbox.as_mut() else {
        fail(format_args!("monitor call without a monitor VM"))
    };
    vm.saved = *regs;
    vm.verdict_to_rax = verdict_to_rax;
    vm.calls += 1;
    // SAFETY: the monitor VM's VMCS was configured by `setup` and is used on this CPU only; it is
    // entered with VMLAUNCH exactly the first time; `regs` is rewritten below to the monitor's.
    if let Err(e) = unsafe { st.vmcs.switch_to(vm.vmcs, !vm.launched) } {
        fail(format_args!("switching to the monitor VM: {e}"));
    }
    vm.launched = true;
    vm.running = true;
    for (field, value) in [
        (guest::RIP, vm.entry),
        (guest::RSP, vm.stack_top),
        (guest::RFLAGS, MONITOR_RFLAGS),
    ] {
        if let Err(e) = st.vmcs.write(field, value) {
            fail(format_args!("monitor VM: {e}"));
        }
    }
    *regs = GuestRegs {
        rdi: code,
        rsi: args[0],
        rdx: args[1],
        rcx: args[2],
        r8: args[3],
        r9: guest_cr3,
        r10: percpu_base,
        ..GuestRegs::default()
    };
}

/// An exit of the monitor VM: its verdict goes back to the guest, anything else is a fault.
pub fn on_exit(st: &mut L0State, regs: &mut GuestRegs) {
    let exit = ihmi_hv::monitor_vm::decode_exit(&mut HwVcpu::new(&mut st.vmcs, regs));
    let Some(vm) = st.outbox.as_mut() else {
        fail(format_args!("monitor VM exit without a monitor VM"))
    };
    match exit {
        ihmi_hv::monitor_vm::MonitorVmExit::Done { verdict } => {
            vm.exits.record(ihmi_vmcs::ExitReason::Vmcall);
            // SAFETY: the guest's VMCS was launched before any monitor call; `regs` is set to the
            // guest's saved registers below, before the stub resumes.
            if let Err(e) = unsafe { st.vmcs.switch_to(vm.guest_vmcs, false) } {
                fail(format_args!("switching back to the guest: {e}"));
            }
            vm.running = false;
            *regs = vm.saved;
            if vm.verdict_to_rax {
                regs.rax = verdict;
            }
            crate::drain_monitor(st);
        }
        ihmi_hv::monitor_vm::MonitorVmExit::Fault {
            reason,
            rip,
            qualification,
        } => {
            // A broken monitor ends the guest whose request it was serving, reported and judged; L0
            // stays up.
            dump_vmcs(&st.vmcs);
            crate::finish(ihmi_hv::GuestEnd::MonitorVmFault {
                reason,
                rip,
                qualification,
            });
        }
    }
}
