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

/// The acceptance rule of the VMX layer, kept by a test: outside `ihmi-vmcs` (which decodes) and
/// `ihmi-vmx` (which reads the VMCS), no source of the exit policy, the judges or L0 names a raw
/// VM-exit information field. They see `VmExit`. Test doubles, which must set raw fields to fake an
/// exit, are exempt, and so is the VMCS12 model (`nested/vmcs12.rs`), whose exit-information fields
/// are L1's, which L0 writes.
#[test]
fn no_raw_exit_field_is_read_outside_the_vmx_layer() {
    use std::path::{Path, PathBuf};
    fn sources(dir: &Path, out: &mut std::vec::Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = std::vec::Vec::new();
    for dir in [
        "core/hv/src",
        "test/judge/src",
        "l0/src",
        "monitor/core/src",
    ] {
        sources(&crates.join(dir), &mut files);
    }
    assert!(files.len() > 20, "found the sources");
    let doubles = ["tests.rs", "mock.rs", "testing.rs", "nested/vmcs12.rs"];
    for file in files {
        if doubles.iter().any(|d| file.ends_with(d)) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let raw = line.contains("fields::ro") || line.contains("ro::");
            assert!(!raw, "{}:{}: raw exit field: {line}", file.display(), n + 1);
        }
    }
}
