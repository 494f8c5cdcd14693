//! The hypercall ABI of `ihmi-abi`, with every argument validated before L0 acts on it.

use ihmi_abi::monitor::Entry;
use ihmi_abi::{CpuidRecord, Hypercall, ReportKind, Status, CONSOLE_MAX, PING_REPLY, REPORT_MAX};
use ihmi_addr::{Gpa, Gva};
use ihmi_paging::Cr3;
use ihmi_vmcs::fields::guest;
use ihmi_vmcs::Instruction;

use crate::memory::GuestRamReader;
use crate::{
    cpl, skip_instruction, Action, GuestEnd, Hypervisor, Observation, Observer, Platform, Vcpu,
};

impl Hypervisor {
    pub(crate) fn on_vmcall(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        instruction: Instruction,
    ) -> Action {
        let regs = *vcpu.regs();
        // Only the guest kernel may call L0.
        let cpl = cpl(vcpu);
        if cpl == 0 && self.outbox_monitor {
            if let Some(action) = self.outbox_linux_syscall(vcpu, instruction) {
                return action;
            }
        }
        let mut mark = None;
        let (status, value) = if cpl != 0 {
            (Status::Denied, 0)
        } else {
            match Hypercall::from_raw(regs.rax) {
                None => (Status::UnknownCall, 0),
                Some(Hypercall::Ping) => (Status::Ok, PING_REPLY),
                Some(Hypercall::ConsoleWrite) => {
                    self.console_write(vcpu, platform, Gva::new(regs.rbx), regs.rcx)
                }
                Some(Hypercall::Report) => (
                    self.report(vcpu, platform, obs, regs.rbx, Gva::new(regs.rcx), regs.rdx),
                    0,
                ),
                Some(Hypercall::Done) => {
                    obs.observe(Observation::Hypercall {
                        nr: regs.rax,
                        status: Status::Ok,
                    });
                    return Action::End(GuestEnd::Done(regs.rbx));
                }
                Some(Hypercall::Monitor) if self.outbox_monitor => {
                    // L0 runs the request in the monitor VM; its verdict becomes RAX. A Linux guest's
                    // come from the call stub only (the exec trampoline's): L0 says whether this one
                    // did, and the monitor refuses it if not.
                    let rip = vcpu.read(guest::RIP);
                    let linux = self.guard.as_ref().and_then(crate::Guard::linux);
                    let entry = match linux.map(|l| l.gate().call_vmcall) {
                        Some(Some(at)) if at.raw() == rip => Entry::CallGate,
                        Some(_) => Entry::Unverified,
                        None => Entry::CallGate,
                    };
                    obs.observe(Observation::Hypercall {
                        nr: regs.rax,
                        status: Status::Ok,
                    });
                    skip_instruction(vcpu, instruction);
                    return Action::CallMonitor {
                        code: regs.rbx,
                        args: [regs.rcx, regs.rdx, regs.rsi, regs.rdi],
                        verdict_to_rax: true,
                        entry,
                        caller_rsp: vcpu.read(guest::RSP),
                    };
                }
                Some(Hypercall::Monitor) => (Status::UnknownCall, 0),
                // L0 drained the ring before this exit reached the policy; the monitor view runs only
                // the gate and the monitor, so nothing else can ask.
                Some(Hypercall::RingHighWater)
                    if self.current_view(vcpu) == Some(crate::guard::views::MONITOR_VIEW) =>
                {
                    (Status::Ok, 0)
                }
                Some(Hypercall::RingHighWater) => (Status::Denied, 0),
                Some(Hypercall::Bench) => {
                    let exits = self.counters.total();
                    match self
                        .bench
                        .mark(regs.rbx, regs.rcx, regs.rdx, regs.rsi, exits)
                    {
                        Ok(m) => {
                            mark = Some(m);
                            (Status::Ok, 0)
                        }
                        Err(status) => (status, 0),
                    }
                }
            }
        };
        obs.observe(Observation::Hypercall {
            nr: regs.rax,
            status,
        });
        if let Some(m) = mark {
            obs.observe(Observation::BenchMark(m));
        }
        let out = vcpu.regs();
        out.rax = status.to_raw();
        if status == Status::Ok {
            out.rbx = value;
        }
        skip_instruction(vcpu, instruction);
        Action::Resume
    }

    fn console_write(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        gva: Gva,
        len: u64,
    ) -> (Status, u64) {
        if len == 0 || len > CONSOLE_MAX {
            return (Status::InvalidArgument, 0);
        }
        let mut buf = [0u8; CONSOLE_MAX as usize];
        let buf = &mut buf[..len as usize];
        if let Err(s) = self.read_guest_virt(vcpu, platform, gva, buf) {
            return (s, 0);
        }
        for line in buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let mut clean = [0u8; CONSOLE_MAX as usize];
            for (d, &s) in clean.iter_mut().zip(line) {
                *d = if (0x20..0x7f).contains(&s) { s } else { b'.' };
            }
            let text = core::str::from_utf8(&clean[..line.len()]).unwrap_or("");
            platform.guest_text(format_args!("guest| {text}"));
        }
        (Status::Ok, len)
    }

    fn report(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        kind: u64,
        gva: Gva,
        len: u64,
    ) -> Status {
        let Some(kind) = ReportKind::from_raw(kind) else {
            return Status::InvalidArgument;
        };
        if len > REPORT_MAX || len as usize != kind.record_len() {
            return Status::InvalidArgument;
        }
        let mut buf = [0u8; REPORT_MAX as usize];
        let buf = &mut buf[..len as usize];
        if let Err(s) = self.read_guest_virt(vcpu, platform, gva, buf) {
            return s;
        }
        match kind {
            ReportKind::Cpuid => match CpuidRecord::decode(buf) {
                Some(record) => {
                    obs.observe(Observation::CpuidReport(record));
                    Status::Ok
                }
                None => Status::InvalidArgument,
            },
        }
    }

    /// Copies guest-virtual memory through the guest's own page tables; only guest RAM may be touched,
    /// both by the page-table walk and by the data itself.
    fn read_guest_virt(
        &self,
        vcpu: &mut impl Vcpu,
        platform: &impl Platform,
        gva: Gva,
        buf: &mut [u8],
    ) -> Result<(), Status> {
        let reader = GuestRamReader {
            map: &self.memory,
            platform,
        };
        if vcpu.read(guest::CR0) & ihmi_arch::cr::CR0_PG == 0 {
            use ihmi_paging::GuestPhysRead;
            // Paging off: the address is guest-physical.
            return reader
                .read_bytes(Gpa::new(gva.raw()), buf)
                .map_err(|_| Status::BadAddress);
        }
        let cr3 = Cr3::new(vcpu.read(guest::CR3));
        ihmi_paging::read_virt(&reader, cr3, gva, buf).map_err(|_| Status::BadAddress)
    }
}
