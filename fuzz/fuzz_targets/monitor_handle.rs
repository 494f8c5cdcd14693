//! The monitor's single entry point with guest-chosen request codes, arguments, CR3, per-CPU base,
//! entry and caller stack (Linux exec and KVM exit requests checked against a fuzzed
//! frame),
//! over guest memory the guest controls (its page tables, task structures, paths and the page cache
//! of the program an exec runs included), for
//! both guest kernels it knows. Whatever comes: no panic, a verdict for every call, at most one event
//! per call (a KVM exit: one more per changed exit-handler entry), a rejected request answered `Rejected` with a `rejected` event, and a ring that stays
//! consistent; every event's JSON line is one line that reads back.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use ihmi_abi::monitor::{Entry, Verdict};
use ihmi_addr::{Gpa, Gva};
use ihmi_monitor::{
    CallContext, Event, EventKind, EventRing, FileLayout, KvmHook, KvmMapHook, KvmOps, KvmVmHooks,
    Monitor, OsProfile, Policy,
};

/// Entries of the fuzzed KVM exit-handler table.
const KVM_HANDLERS: usize = 4;
use ihmi_paging::{Cr3, GuestPhysRead, PhysReadError};
use ihmi_wire::EventLine;
use libfuzzer_sys::fuzz_target;

/// Guest memory: 64 MiB of RAM, words the input sets, zeros elsewhere.
struct Memory(BTreeMap<u64, u64>);

const RAM_END: u64 = 0x400_0000;

impl GuestPhysRead for Memory {
    fn read_bytes(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), PhysReadError> {
        let end = gpa
            .raw()
            .checked_add(buf.len() as u64)
            .ok_or(PhysReadError { gpa })?;
        if end > RAM_END {
            return Err(PhysReadError { gpa });
        }
        for (i, b) in buf.iter_mut().enumerate() {
            let a = gpa.raw() + i as u64;
            let word = self.0.get(&(a & !7)).copied().unwrap_or(0);
            *b = word.to_le_bytes()[(a & 7) as usize];
        }
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
struct Call {
    code: u8,
    args: [u64; 4],
    cr3: u32,
    percpu_base: u64,
}

#[derive(Arbitrary, Debug)]
struct Input {
    linux: bool,
    enforcing: bool,
    memory: Vec<(u32, u64)>,
    calls: Vec<Call>,
}

fuzz_target!(|input: Input| {
    let memory = Memory(
        input
            .memory
            .iter()
            .take(1024)
            .map(|&(a, v)| ((u64::from(a) % RAM_END) & !7, v))
            .collect(),
    );
    let os = if input.linux {
        OsProfile::linux(Gva::new(0x1_8040), 0x2ec, 0x2f0, 0x440, true, 0x48)
            .with_exec_returns(0xffff_ffff_8200_0123, 0xffff_ffff_8112_6cfe)
            // The tiny kernel's layout, but for 16 slots a node.
            .with_files(FileLayout {
                binprm_file: 0x40,
                file_mapping: 0xf0,
                mapping_host: 0,
                mapping_pages: 0x10,
                inode_ino: 0x40,
                inode_size: 0x50,
                inode_ctime: 0x78,
                inode_mtime: 0x68,
                node_shift: 0,
                node_slots: 0x28,
                chunk_shift: 4,
                page_struct_size: 64,
                vmemmap_base: Gva::new(0xffff_ffff_8170_0000),
            })
            // KVM's exit hook, over a four-entry exit-handler table in the kernel's image mapping.
            .with_kvm(KvmHook {
                returns: [0xffff_ffff_8200_0156, 0xffff_ffff_8106_ec4c],
                exit_reason: 0x1a2c,
                handlers: 0xffff_ffff_8100_8000,
                handler_count: KVM_HANDLERS,
                expected: {
                    let mut e = [0; ihmi_abi::monitor::KVM_EXIT_HANDLERS_MAX];
                    e[..KVM_HANDLERS].copy_from_slice(&[0xffff_ffff_8106_1000, 0, 7, 8]);
                    e
                },
                // And its mapping hook, the kernel's image in the first 16 MiB of RAM.
                map: Some(KvmMapHook {
                    returns: [0xffff_ffff_8200_0313, 0xffff_ffff_8104_2b65],
                    slot_base_gfn: 0x60,
                    slot_npages: 0x68,
                    slot_userspace_addr: 0x98,
                    role: 0x2c,
                    image: [
                        [0x100_0000, 0x160_2000],
                        [0x180_0000, 0x1a9_3000],
                        [0x1c0_0000, 0x1d2_1000],
                        [0x1ddb_000, 0x200_0000],
                    ],
                }),
                // And its memslot and vCPU hooks.
                vm: Some(KvmVmHooks {
                    memslot_returns: [0xffff_ffff_8200_0363, 0xffff_ffff_8103_5967],
                    vcpu_returns: [0xffff_ffff_8200_03b3, 0xffff_ffff_8103_38a7],
                    vcpu_destroy_returns: [0xffff_ffff_8200_0413, 0xffff_ffff_8103_3920],
                    slot_base_gfn: 0x60,
                    slot_npages: 0x68,
                    slot_userspace_addr: 0x98,
                    slot_id: 0xa4,
                    slot_as_id: 0xa6,
                    slot_flags: 0xa0,
                    vcpu_kvm: 0,
                    vcpu_id: 0x30,
                    vcpu_vmcs01: 0x80,
                    vcpu_loaded_vmcs: 0xd0,
                }),
                // And `kvm_x86_ops`, 20 words of the kernel's data as they were at boot (a chunk
                // and a part of one).
                ops: Some(KvmOps {
                    at: 0xffff_ffff_8100_9000,
                    words: 20,
                    expected: {
                        let mut e = [0; ihmi_abi::monitor::KVM_X86_OPS_MAX];
                        for (i, w) in e[..20].iter_mut().enumerate() {
                            *w = 0xffff_ffff_8106_0000 + 0x40 * i as u64;
                        }
                        e
                    },
                }),
            })
    } else {
        OsProfile::testguest(Gva::new(0x10_2000))
    };
    let mut policy = Policy::allow_all();
    if input.enforcing {
        let _ = policy.allow(b"init");
        let _ = policy.allow_digest([0x5a; 32]);
    }
    let mut monitor = Monitor::new(os, policy);
    let mut ring = Box::new(EventRing::new());
    for (i, call) in input.calls.iter().take(64).enumerate() {
        // The code's upper bits choose the entry; the caller's stack is the per-CPU base's neighbour
        // (both guest-chosen kernel addresses), so the existing corpus keeps its meaning.
        let ctx = CallContext {
            cr3: Cr3::new(u64::from(call.cr3) & !0xfff),
            tsc: i as u64,
            percpu_base: call.percpu_base,
            entry: Entry::from_raw(u64::from(call.code / 8 % 3)),
            caller_rsp: call.percpu_base.wrapping_add(u64::from(call.cr3) & 0xff8),
        };
        let produced = ring.produced();
        let verdict = monitor.handle(
            u64::from(call.code % 12),
            call.args,
            &ctx,
            &memory,
            &mut ring,
        );
        assert!(ring.is_consistent());
        // One event per call at most, but for a KVM exit, which adds one per exit-handler entry
        // found changed, and a KVM mapping, which adds one when the frame is not the VM's own.
        assert!(
            ring.produced() - produced <= 1 + KVM_HANDLERS as u64,
            "one event per call at most, and one per changed handler"
        );
        if verdict == Verdict::Rejected && ring.produced() > produced {
            let mut last = None;
            ring.drain(|e| {
                check_line(e, monitor.os());
                last = Some(*e);
            });
            let last = last.expect("the event just produced");
            assert!(
                last.kind() == Some(EventKind::Rejected)
                    || last.verdict == Verdict::Rejected as i32
            );
        } else {
            ring.drain(|e| check_line(e, monitor.os()));
        }
    }
});

/// The event's `event|` line, with guest-chosen names in it, is one line that reads back as the
/// event it was written from.
fn check_line(e: &Event, os: &OsProfile) {
    let line = format!("{}", e.json("inbox", os));
    assert!(!line.contains('\n'), "{line}");
    let back: EventLine<String> = serde_json::from_str(&line).expect("the line reads back");
    assert_eq!(back.seq(), e.seq, "{line}");
}
