//! The exit handler on a vCPU whose exits are arbitrary (any exit reason and exit-information
//! fields, any registers), for a guest with an in-box monitor and a Linux system-call gate and hook
//! (the guard's paths), over arbitrary guest memory, with nested VMX offered in half the runs (a
//! quarter of those with nested EPT), so VMX instructions with arbitrary operands reach the
//! emulation. Whatever happens: no panic, each exit either resumes, calls the monitor or ends the
//! guest with its end observed, and nothing is observed to end twice.
#![no_main]

use arbitrary::Arbitrary;
use ihmi_addr::{Gpa, GpaRange, Gva};
use ihmi_ept::Eptp;
use ihmi_hv::linux::gate::GateEntry;
use ihmi_hv::linux::hooks::{ExecHook, HookSite};
use ihmi_hv::nested::caps::{NestedFeatures, VirtualVmx};
use ihmi_hv::nested::vmx::NestedVmx;
use ihmi_hv::{
    Action, Guard, Hypervisor, KernelImage, LinuxGate, MemoryMap, MonitorWord, NestedSwitch,
    Observation, RegionKind, ViewEptps,
};
use ihmi_hv_mock::{vmx_host_caps, MockPlatform, MockVcpu, Recorder, Seen};
use ihmi_vmcs::fields::{control, guest, ro};
use libfuzzer_sys::fuzz_target;

const GUEST_EPTP: u64 = 0xa01e;
const MONITOR_EPTP: u64 = 0xb01e;

#[derive(Arbitrary, Debug)]
struct Exit {
    reason: u16,
    qualification: u64,
    gpa: u32,
    gla: u64,
    interruption: u32,
    len: u8,
    rip: u64,
    rax: u64,
    rcx: u64,
    rdx: u64,
    rbx: u64,
    monitor_view: bool,
    user: bool,
    rflags: u64,
}

#[derive(Arbitrary, Debug)]
struct Input {
    memory: Vec<(u32, u64)>,
    outbox: bool,
    exits: Vec<Exit>,
}

fuzz_target!(|input: Input| {
    let mut map = MemoryMap::default();
    let r = |a: u64, b: u64| GpaRange::new(Gpa::new(a), Gpa::new(b));
    map.add(r(0, 0x80_0000), RegionKind::GuestRam).unwrap();
    map.add(r(0x80_0000, 0x90_0000), RegionKind::L0).unwrap();
    map.add(r(0x90_0000, 0xf00_0000), RegionKind::GuestRam)
        .unwrap();
    map.add(r(0xf00_0000, 0xf20_0000), RegionKind::Monitor)
        .unwrap();
    let mut p = MockPlatform::default();
    for (at, value) in input.memory.iter().take(512) {
        p.write_u64((u64::from(*at) % 0xf20_0000) & !7, *value);
    }
    p.fence = Some(map.clone());
    let gate = LinuxGate {
        entries: [
            (0xffff_e900_0000_00ad, 0xf00_0fe8, 0xffff_e900_0000_0300),
            (0xffff_e900_0000_02ad, 0xf00_0ff0, 0xffff_e900_0000_0310),
            (0xffff_e900_0000_03ad, 0xf00_0ff8, 0xffff_e900_0000_0320),
        ]
        .map(|(gate, slot, stub)| GateEntry {
            gate: Gva::new(gate),
            kernel_slot: MonitorWord::new(Gpa::new(slot)),
            outbox_vmcall: input.outbox.then_some(Gva::new(stub)),
        }),
        pgd: Gpa::new(0x50_0000),
        slot: 466,
        pml4e: 0xf00_1023,
        pti_pgd_pair: true,
        gate_page: Gpa::new(0xf00_0000),
        exec_hook: Some(ExecHook {
            site: Gva::new(0xffff_ffff_8112_6cf9),
            site_pa: Gpa::new(0x112_6cf9),
            trampoline: Gva::new(0xffff_ffff_8200_01d8),
            slot_va: Gva::new(0xffff_ffff_8200_0000),
            table: Gpa::new(0xf00_4000),
            gate_page: Gpa::new(0xf00_0000),
            pgd: Gpa::new(0x50_0000),
        }),
        kernel: KernelImage {
            text: GpaRange::new(Gpa::new(0x100_0000), Gpa::new(0x140_2000)),
            rodata: GpaRange::new(Gpa::new(0x160_0000), Gpa::new(0x181_0000)),
            idt: GpaRange::new(Gpa::new(0x1bb_1000), Gpa::new(0x1bb_2000)),
        },
        call_vmcall: input.outbox.then_some(Gva::new(0xffff_e900_0000_0340)),
        io_uring_hook: Some(HookSite {
            site: Gva::new(0xffff_ffff_8116_0f20),
            site_pa: Gpa::new(0x116_0f20),
            trampoline: Gva::new(0xffff_ffff_8200_0260),
        }),
        kvm_exit_hook: Some(HookSite {
            site: Gva::new(0xffff_ffff_8106_ec47),
            site_pa: Gpa::new(0x106_ec47),
            trampoline: Gva::new(0xffff_ffff_8200_02a0),
        }),
        l2_map_hook: Some(HookSite {
            site: Gva::new(0xffff_ffff_8104_2b60),
            site_pa: Gpa::new(0x104_2b60),
            trampoline: Gva::new(0xffff_ffff_8200_0300),
        }),
        memslot_hook: Some(HookSite {
            site: Gva::new(0xffff_ffff_8103_5962),
            site_pa: Gpa::new(0x103_5962),
            trampoline: Gva::new(0xffff_ffff_8200_0360),
        }),
        vcpu_create_hook: Some(HookSite {
            site: Gva::new(0xffff_ffff_8103_38a2),
            site_pa: Gpa::new(0x103_38a2),
            trampoline: Gva::new(0xffff_ffff_8200_03c0),
        }),
        vcpu_destroy_hook: Some(HookSite {
            site: Gva::new(0xffff_ffff_8103_391b),
            site_pa: Gpa::new(0x103_391b),
            trampoline: Gva::new(0xffff_ffff_8200_0420),
        }),
    };
    let mut hv = Hypervisor::new(map);
    hv.outbox_monitor = input.outbox;
    // Chosen by the memory list's length, so the existing corpus keeps its meaning.
    if input.memory.len() % 2 == 1 {
        // A quarter of those with nested EPT (INVEPT, EPT02 from the guest's EPT12 in the fuzzed
        // memory), on a pool small enough to fill.
        let features = if input.memory.len() % 8 == 5 {
            p.ept02 = Some(ihmi_hv_mock::MockEpt02Tables::new(6));
            NestedFeatures::NestedEpt
        } else {
            NestedFeatures::ShadowPaging
        };
        let nested = NestedVmx::new(VirtualVmx::offer(&vmx_host_caps(&[]), features).unwrap());
        // Half of those with VMCS shadowing (the mock's shadow VMCS lives across the exits).
        hv.nested = Some(if input.memory.len() % 4 == 3 {
            nested.with_shadowing()
        } else {
            nested
        });
    }
    let mut shadow = hv
        .nested
        .as_ref()
        .is_some_and(NestedVmx::shadowing)
        .then(std::collections::BTreeMap::new);
    hv.guard = Some(
        Guard::new(
            ViewEptps {
                guest: Eptp::from_raw(GUEST_EPTP),
                monitor: Some(Eptp::from_raw(MONITOR_EPTP)),
            },
            None,
        )
        .with_linux_gate(gate),
    );
    let mut rec = Recorder::default();
    for e in input.exits.iter().take(32) {
        let mut v = MockVcpu::exited(u32::from(e.reason) % 80, e.rip, u64::from(e.len % 16));
        v.fields.insert(ro::EXIT_QUALIFICATION, e.qualification);
        v.fields
            .insert(ro::GUEST_PHYSICAL_ADDR_FULL, u64::from(e.gpa));
        v.fields.insert(ro::GUEST_LINEAR_ADDR, e.gla);
        v.fields
            .insert(ro::VMEXIT_INTERRUPTION_INFO, u64::from(e.interruption));
        // A VMX instruction's operand information: the same fuzzed word. With nested VMX the guest
        // has set CR4.VMXE (in the read shadow), so VMXON can succeed and the VMCS instructions run.
        v.fields
            .insert(ro::VMEXIT_INSTRUCTION_INFO, u64::from(e.interruption));
        if hv.nested.is_some() {
            let vmxe = ihmi_arch::cr::CR4_VMXE;
            v.fields.insert(guest::CR4, 0x20 | vmxe);
            v.fields.insert(control::CR4_GUEST_HOST_MASK, vmxe);
            v.fields.insert(control::CR4_READ_SHADOW, vmxe);
        }
        v.fields.insert(
            control::EPTP_FULL,
            if e.monitor_view {
                MONITOR_EPTP
            } else {
                GUEST_EPTP
            },
        );
        v.fields.insert(guest::RFLAGS, e.rflags);
        if e.user {
            v.fields.insert(guest::SS_ACCESS_RIGHTS, 0xc0f3);
        }
        (v.regs.rax, v.regs.rcx, v.regs.rdx, v.regs.rbx) = (e.rax, e.rcx, e.rdx, e.rbx);
        v.shadow = shadow.take();
        let seen_before = rec.seen.len();
        let action = hv.handle_exit(&mut v, &mut p, &mut rec);
        shadow = v.shadow.take();
        let ended = rec.seen[seen_before..]
            .iter()
            .filter(|s| matches!(s, Seen::Other(Observation::Ended { .. })))
            .count();
        match action {
            Action::End(end) => {
                assert_eq!(ended, 1, "an end is observed once");
                assert!(matches!(
                    rec.seen.last(),
                    Some(Seen::Other(Observation::Ended { end: e, .. })) if *e == end
                ));
                break;
            }
            Action::Resume | Action::CallMonitor { .. } => assert_eq!(ended, 0),
            // Nested VMX: L0 would make the other VMCS current; the policy fills it in, and the
            // next fuzzed exits come from L2 (or L1 again).
            Action::SwitchVmcs(to) => {
                assert_eq!(ended, 0);
                let mut other = MockVcpu {
                    shadow: shadow.take(),
                    ..MockVcpu::default()
                };
                assert_eq!(
                    hv.on_vmcs_switched(&mut other, &mut rec, to),
                    Action::Resume
                );
                shadow = other.shadow.take();
                assert_eq!(hv.in_l2(), to == NestedSwitch::ToL2);
            }
        }
    }
});
