//! The closing summary of `ihmi demo`: what the two monitors saw in the Linux guest, from the event lines
//! L0 printed (`event| {json}`) and its own counts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use ihmi_wire::EventLine;

/// One program start the process-creation monitor saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    pub filename: String,
    /// The program's SHA-256 (hexadecimal), or why the monitor has none.
    pub sha256: Result<String, String>,
    pub verdict: String,
}

/// A basic VM-exit reason's name (SDM Appendix C), for the reasons a KVM guest commonly makes.
fn exit_reason_name(reason: u64) -> String {
    match reason {
        0 => "exception or NMI".into(),
        1 => "external interrupt".into(),
        7 => "interrupt window".into(),
        10 => "CPUID".into(),
        12 => "HLT".into(),
        18 => "VMCALL".into(),
        28 => "control-register access".into(),
        30 => "I/O".into(),
        31 => "RDMSR".into(),
        32 => "WRMSR".into(),
        48 => "EPT violation".into(),
        49 => "EPT misconfiguration".into(),
        n => format!("reason {n}"),
    }
}

/// What the demo's monitors reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// System-call events, and their count per call name (or number).
    pub syscalls: u64,
    pub by_call: BTreeMap<String, u64>,
    /// Distinct processes that made system calls, by name.
    pub processes: BTreeMap<String, u64>,
    /// Program starts, in order.
    pub execs: Vec<Exec>,
    /// Requests the monitor's checkpoint refused.
    pub rejected: u64,
    /// Exits of KVM's guest the in-hypervisor monitor saw, by basic reason, and what it found
    /// broken (property, index, address, expected, found).
    pub kvm_exits: u64,
    pub kvm_exit_reasons: BTreeMap<u64, u64>,
    pub integrity: Vec<(String, u64, u64, u64, u64, Option<String>)>,
    /// Mappings KVM made for its guest that the monitor checked, and those onto a frame that is not
    /// the VM's own memory.
    pub l2_maps: u64,
    pub l2_maps_wrong: u64,
    /// Memslot changes and vCPUs KVM made, as the monitor saw them.
    pub memslots: u64,
    pub vcpus: u64,
    /// The VMCS regions the monitor registered for them (L0 lets no other enter L2), and the vCPUs
    /// KVM destroyed (their regions leave the registry).
    pub vmcs_regions: Vec<u64>,
    pub vcpus_destroyed: u64,
    /// Events the ring dropped (L0's count), if the run said.
    pub dropped: Option<u64>,
}

impl Summary {
    /// Reads every event line of a run's output.
    pub fn from_output(output: &str) -> Result<Self> {
        let mut s = Self {
            dropped: crate::events::dropped(output),
            ..Self::default()
        };
        let mut pids = BTreeMap::<String, std::collections::BTreeSet<u32>>::new();
        for event in crate::events::parse(output)? {
            match event {
                EventLine::Syscall {
                    pid,
                    comm,
                    entry,
                    nr,
                    name,
                    ..
                } => {
                    s.syscalls += 1;
                    let mut name = name.unwrap_or_else(|| format!("#{nr}"));
                    // A 32-bit call is counted apart: its number and name are the i386 table's.
                    if entry != "syscall" {
                        name = format!("{name} ({entry})");
                    }
                    *s.by_call.entry(name).or_default() += 1;
                    pids.entry(comm).or_default().insert(pid);
                }
                EventLine::Exec {
                    pid,
                    ppid,
                    comm,
                    filename,
                    sha256,
                    unhashed,
                    verdict,
                    ..
                } => s.execs.push(Exec {
                    pid,
                    ppid,
                    comm,
                    filename,
                    sha256: sha256.ok_or_else(|| unhashed.unwrap_or_default()),
                    verdict,
                }),
                EventLine::IoUring {
                    pid,
                    comm,
                    opcode,
                    op,
                    ..
                } => {
                    // Counted with the calls, named as io_uring operations.
                    let op = op.unwrap_or_else(|| format!("#{opcode}"));
                    *s.by_call.entry(format!("{op} (io_uring)")).or_default() += 1;
                    pids.entry(comm).or_default().insert(pid);
                }
                EventLine::Rejected { .. } => s.rejected += 1,
                EventLine::KvmExit { reason, .. } => {
                    s.kvm_exits += 1;
                    *s.kvm_exit_reasons.entry(reason & 0xffff).or_default() += 1;
                }
                EventLine::Integrity {
                    property,
                    index,
                    address,
                    expected,
                    found,
                    what,
                    ..
                } => s
                    .integrity
                    .push((property, index, address, expected, found, what)),
                EventLine::Memslot { .. } => s.memslots += 1,
                EventLine::VcpuCreate { vmcs, .. } => {
                    s.vcpus += 1;
                    s.vmcs_regions.push(vmcs);
                }
                EventLine::VcpuDestroy { .. } => s.vcpus_destroyed += 1,
                EventLine::L2Map { memory, .. } => {
                    s.l2_maps += 1;
                    s.l2_maps_wrong += u64::from(memory != "vm");
                }
                EventLine::ProcessCreate { .. } | EventLine::Invalid { .. } => {}
            }
        }
        s.processes = pids
            .into_iter()
            .map(|(name, set)| (name, set.len() as u64))
            .collect();
        Ok(s)
    }

    /// The summary as the demo prints it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "[ihmi] demo summary");
        let _ = writeln!(
            out,
            "  system calls seen by the in-box system-call monitor: {}",
            self.syscalls
        );
        let mut top: Vec<_> = self.by_call.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let top: Vec<String> = top
            .iter()
            .take(8)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        let _ = writeln!(out, "    most frequent: {}", top.join(", "));
        let procs: Vec<String> = self
            .processes
            .iter()
            .map(|(name, n)| {
                if *n == 1 {
                    name.clone()
                } else {
                    format!("{name} (x{n})")
                }
            })
            .collect();
        let _ = writeln!(out, "    from processes: {}", procs.join(", "));
        let _ = writeln!(
            out,
            "  programs started, seen by the in-box process-creation monitor: {}",
            self.execs.len()
        );
        for e in &self.execs {
            let _ = writeln!(
                out,
                "    {:<6} pid {:>3} (parent {:>3}, was {:<14}) {}",
                e.verdict, e.pid, e.ppid, e.comm, e.filename
            );
        }
        let refused: Vec<&Exec> = self.execs.iter().filter(|e| e.verdict != "allow").collect();
        if refused.is_empty() {
            let _ = writeln!(out, "  refused: none");
        } else {
            for e in refused {
                let why = match &e.sha256 {
                    Ok(d) => format!(
                        "its content (sha256 {}…) is not on the allow-list",
                        &d[..d.len().min(16)]
                    ),
                    Err(why) => format!("its content could not be read ({why})"),
                };
                let _ = writeln!(
                    out,
                    "  REFUSED: {} (pid {}, started by {}): {why}; execve failed with EPERM",
                    e.filename, e.pid, e.comm
                );
            }
        }
        if self.kvm_exits > 0 || !self.integrity.is_empty() {
            let mut reasons: Vec<_> = self.kvm_exit_reasons.iter().collect();
            reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let reasons: Vec<String> = reasons
                .iter()
                .map(|(r, n)| format!("{} {n}", exit_reason_name(**r)))
                .collect();
            let _ = writeln!(
                out,
                "  exits of KVM's guest seen by the in-hypervisor monitor: {} ({})",
                self.kvm_exits,
                reasons.join(", ")
            );
            let _ = writeln!(
                out,
                "  mappings KVM made for its guest, checked by the monitor: {} ({} onto memory not the VM's own)",
                self.l2_maps, self.l2_maps_wrong
            );
            let regions: Vec<String> = self
                .vmcs_regions
                .iter()
                .map(|r| format!("{r:#x}"))
                .collect();
            let _ = writeln!(
                out,
                "  memslot changes KVM committed: {}; vCPUs it created: {}, destroyed: {} (VMCS regions registered, the only ones L0 lets enter L2: {})",
                self.memslots,
                self.vcpus,
                self.vcpus_destroyed,
                if regions.is_empty() { "none".to_string() } else { regions.join(", ") }
            );
            for (property, index, address, expected, found, what) in &self.integrity {
                let _ = match what {
                    Some(what) => writeln!(
                        out,
                        "  INTEGRITY: {property}: KVM maps its guest's {address:#x} onto {found:#x} ({what})"
                    ),
                    None => writeln!(
                        out,
                        "  INTEGRITY: {property}[{index}] at {address:#x} is {found:#x}, must be {expected:#x} ({})",
                        if property == "kvm_x86_ops" {
                            "as the boot left it"
                        } else {
                            "the kernel image's"
                        }
                    ),
                };
            }
        }
        let _ = writeln!(
            out,
            "  requests the monitor's checkpoint rejected: {}",
            self.rejected
        );
        let _ = match self.dropped {
            Some(n) => writeln!(out, "  events dropped by a full ring: {n}"),
            None => writeln!(out, "  events dropped: not reported (did the run end?)"),
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_calls_processes_and_refusals() {
        let out = "\
event| {\"seq\":0,\"tsc\":1,\"mode\":\"inbox\",\"event\":\"syscall\",\"pid\":5,\"comm\":\"sh\",\"entry\":\"syscall\",\"nr\":39,\"name\":\"getpid\",\"args\":[0,0,0],\"verdict\":\"allow\"}
guest| hello
event| {\"seq\":1,\"tsc\":2,\"mode\":\"inbox\",\"event\":\"syscall\",\"pid\":6,\"comm\":\"sh\",\"entry\":\"syscall\",\"nr\":999,\"name\":null,\"args\":[0,0,0],\"verdict\":\"allow\"}
event| {\"seq\":3,\"tsc\":4,\"mode\":\"inbox\",\"event\":\"syscall\",\"pid\":6,\"comm\":\"sh\",\"entry\":\"int80\",\"nr\":20,\"name\":\"getpid\",\"args\":[0,0,0],\"verdict\":\"allow\"}
event| {\"seq\":2,\"tsc\":3,\"mode\":\"inbox\",\"event\":\"exec\",\"pid\":7,\"ppid\":1,\"comm\":\"init\",\"filename\":\"/bin/ihmi-intruder\",\"sha256\":\"7050b5940f81866d8db6a9d4d87bda91373a6c9ff7dc83c3c483c4e4cb762ae3\",\"verdict\":\"deny\"}
monitor: 3 events, 0 dropped
";
        let s = Summary::from_output(out).unwrap();
        assert_eq!(s.syscalls, 3);
        assert_eq!(s.by_call.get("getpid"), Some(&1));
        assert_eq!(s.by_call.get("getpid (int80)"), Some(&1));
        assert_eq!(s.by_call.get("#999"), Some(&1));
        assert_eq!(s.processes.get("sh"), Some(&2));
        assert_eq!(s.execs.len(), 1);
        assert_eq!(s.dropped, Some(0));
        let text = s.render();
        assert!(text.contains("REFUSED: /bin/ihmi-intruder (pid 7, started by init): its content (sha256 7050b5940f81866d…) is not on the allow-list"), "{text}");
        assert!(text.contains("events dropped by a full ring: 0"));
        assert!(!text.contains("KVM"), "no KVM part without KVM events");
    }

    #[test]
    fn summary_counts_kvm_exits_by_reason_and_names_what_broke() {
        let exit = |seq: u64, reason: u64| {
            format!("event| {{\"event\":\"kvm_exit\",\"seq\":{seq},\"tsc\":1,\"mode\":\"inbox\",\"pid\":32,\"comm\":\"ihmi-l1-vmm\",\"vcpu\":1,\"reason\":{reason},\"handlers_checked\":76,\"handlers_changed\":1,\"verdict\":\"allow\"}}\n")
        };
        let out = [
            "event| {\"event\":\"integrity\",\"seq\":0,\"tsc\":1,\"mode\":\"inbox\",\"property\":\"kvm_exit_handlers\",\"index\":18,\"address\":4096,\"expected\":16,\"found\":32}\n".to_string(),
            exit(1, 10),
            exit(2, 10),
            exit(3, 0),
            "event| {\"event\":\"vcpu_create\",\"seq\":4,\"tsc\":1,\"mode\":\"inbox\",\"pid\":32,\"comm\":\"ihmi-l1-vmm\",\"vcpu\":1,\"kvm\":2,\"vcpu_id\":0,\"vmcs\":48332800,\"verdict\":\"allow\"}\n".to_string(),
        ]
        .concat();
        let s = Summary::from_output(&out).unwrap();
        assert_eq!(s.kvm_exits, 3);
        assert!(
            s.render()
                .contains("vCPUs it created: 1, destroyed: 0 (VMCS regions registered, the only ones L0 lets enter L2: 0x2e18000)"),
            "{}",
            s.render()
        );
        let text = s.render();
        assert!(
            text.contains("seen by the in-hypervisor monitor: 3 (CPUID 2, exception or NMI 1)"),
            "{text}"
        );
        assert!(
            text.contains("INTEGRITY: kvm_exit_handlers[18] at 0x1000 is 0x20, must be 0x10"),
            "{text}"
        );
    }
}
