//! The hypercall ABI with guest-chosen registers, privilege, paging state and guest memory (page
//! tables and buffers included): every call is answered with a status and the guest goes on (or it
//! ends, for `Done`), and L0 never reads a byte of its own memory on the guest's behalf.
#![no_main]

use arbitrary::Arbitrary;
use ihmi_hv::{Action, Hypervisor};
use ihmi_hv_mock::{memory_with_l0_hole, MockPlatform, MockVcpu, Recorder, L0_HOLE};
use ihmi_vmcs::fields::guest;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Call {
    rax: u8,
    rbx: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    user: bool,
    paging: bool,
    cr3: u32,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Words of guest memory: (address in the first 16 MiB, value).
    memory: Vec<(u32, u64)>,
    calls: Vec<Call>,
}

fuzz_target!(|input: Input| {
    let map = memory_with_l0_hole();
    let mut p = MockPlatform::default();
    for (at, value) in input.memory.iter().take(256) {
        p.write_u64(u64::from(*at) & 0xff_fff8, *value);
    }
    p.fence = Some(map.clone());
    let mut hv = Hypervisor::new(map);
    let mut rec = Recorder::default();
    for call in input.calls.iter().take(32) {
        let mut v = MockVcpu::exited(18, 0x10_0000, 3);
        // Small numbers reach every hypercall; the rest are unknown ones.
        v.regs.rax = if call.rax < 16 {
            u64::from(call.rax)
        } else {
            u64::from(call.rax) << 40
        };
        v.regs.rbx = call.rbx;
        v.regs.rcx = call.rcx;
        v.regs.rdx = call.rdx;
        v.regs.rsi = call.rsi;
        if call.user {
            v.fields.insert(guest::SS_ACCESS_RIGHTS, 0xc0f3);
        }
        if !call.paging {
            v.fields.insert(guest::CR0, 0x11);
        }
        v.fields.insert(guest::CR3, u64::from(call.cr3) & !0xfff);
        let action = hv.handle_exit(&mut v, &mut p, &mut rec);
        if matches!(action, Action::End(_)) {
            break;
        }
        assert_eq!(action, Action::Resume, "only Done ends; no monitor VM here");
        assert_eq!(
            v.fields[&guest::RIP],
            0x10_0003,
            "every call is stepped past"
        );
    }
    for (gpa, len) in p.phys_reads() {
        let end = gpa.raw().saturating_add(len as u64);
        assert!(
            end <= L0_HOLE || gpa.raw() >= L0_HOLE + 0x10_0000,
            "read of L0 memory at {gpa}+{len:#x}"
        );
    }
});
