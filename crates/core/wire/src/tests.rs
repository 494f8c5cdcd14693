use std::format;
use std::string::{String, ToString};

use super::*;

fn line<T: Serialize>(v: &T) -> String {
    format!("{}", Json(v))
}

#[test]
fn guest_bytes_cannot_end_the_line_or_add_a_field() {
    let comm = b"a\"b\\c\nd\xff\x01";
    let e = EventLine::ProcessCreate {
        seq: 1,
        tsc: 2,
        mode: Text::Str("inbox"),
        pid: 3,
        ppid: 4,
        comm: Text::Bytes(comm),
        verdict: Text::Str("allow"),
    };
    let s = line(&e);
    assert!(!s.contains('\n'), "{s}");
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    let o = v.as_object().unwrap();
    assert_eq!(o.len(), 8, "{s}");
    let back: String = o["comm"].as_str().unwrap().to_string();
    let bytes: std::vec::Vec<u8> = back.chars().map(|c| c as u32 as u8).collect();
    assert_eq!(
        bytes, comm,
        "every byte reads back as the character of its number"
    );
    assert!(back.chars().all(|c| (c as u32) < 0x100));
}

#[test]
fn a_value_too_long_for_the_buffer_is_an_error_line_not_a_cut_one() {
    let long = "x".repeat(LINE_MAX);
    let a = AttackLine {
        attack: Text::Str("forged-pte"),
        item: 1,
        blocked: true,
        reported: true,
        monitor_intact: true,
        detail: Text::Str(&long),
    };
    assert_eq!(line(&a), TOO_LONG);
    assert!(serde_json::from_str::<AttackLine<String>>(TOO_LONG).is_err());
}

#[test]
fn a_display_value_is_escaped_too() {
    struct Parts;
    impl fmt::Display for Parts {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "one; \"two\"; {}", 3)
        }
    }
    let a = AttackLine {
        attack: Text::Str("a"),
        item: 2,
        blocked: false,
        reported: true,
        monitor_intact: true,
        detail: Text::Display(&Parts),
    };
    let back: AttackLine<String> = serde_json::from_str(&line(&a)).unwrap();
    assert_eq!(back.detail, "one; \"two\"; 3");
    assert!(!back.passed());
    assert_eq!(back.item, 2);
}

#[cfg(feature = "std")]
mod host {
    use super::*;

    #[test]
    fn bench_lines_read_back_as_the_variant_written() {
        let start = BenchLine::Start(BenchStart {
            start: Text::Str("invoke-null"),
        });
        let window = BenchLine::Window(BenchWindow {
            bench: Text::Str("invoke-null"),
            mode: Text::Str("inbox"),
            calls: 100,
            tsc: 5000,
            exits: 0,
            invocations: 100,
            vmfuncs_per_invocation: 2,
            cr3_loads_per_invocation: 0,
            vmcs_switches_per_invocation: 0,
        });
        let s: BenchLine<String> = serde_json::from_str(&line(&start)).unwrap();
        assert!(matches!(s, BenchLine::Start(BenchStart { ref start }) if start == "invoke-null"));
        let w: BenchLine<String> = serde_json::from_str(&line(&window)).unwrap();
        let BenchLine::Window(w) = w else {
            panic!("a window read back as {w:?}");
        };
        assert_eq!((w.calls, w.tsc, w.vmfuncs_per_invocation), (100, 5000, 2));
        assert!(serde_json::from_str::<BenchLine<String>>(r#"{"bench":"x"}"#).is_err());
    }

    #[test]
    fn every_event_kind_reads_back_and_compares_without_time_and_mode() {
        let events = [
            EventLine::Syscall {
                seq: 0,
                tsc: 10,
                mode: Text::Str("inbox"),
                pid: 1,
                comm: Text::Bytes(b"init"),
                entry: Text::Str("syscall"),
                nr: 39,
                name: Some(Text::Str("getpid")),
                args: [1, 2, 3],
                exec_mapping: true,
                verdict: Text::Str("allow"),
            },
            EventLine::Syscall {
                seq: 1,
                tsc: 10,
                mode: Text::Str("inbox"),
                pid: 1,
                comm: Text::Bytes(b"init"),
                entry: Text::Str("int80"),
                nr: 999,
                name: None,
                args: [0; 3],
                exec_mapping: false,
                verdict: Text::Str("allow"),
            },
            EventLine::Exec {
                seq: 2,
                tsc: 11,
                mode: Text::Str("inbox"),
                pid: 2,
                ppid: 1,
                comm: Text::Bytes(b"sh"),
                filename: Text::Bytes(b"/bin/ihmi-intruder"),
                filename_truncated: true,
                sha256: Some(Text::HexWords(&[0x0123_4567_89ab_cdef, 0, 0, u64::MAX])),
                unhashed: None,
                verdict: Text::Str("deny"),
            },
            EventLine::Rejected {
                seq: 3,
                tsc: 12,
                mode: Text::Str("inbox"),
                reason: Text::Str("bad-code"),
                code: 77,
                args: [1, 2, 3, 4],
                verdict: Text::Str("rejected"),
            },
            EventLine::Invalid {
                seq: 4,
                tsc: 13,
                mode: Text::Str("inbox"),
                kind: 9,
            },
            EventLine::IoUring {
                seq: 5,
                tsc: 14,
                mode: Text::Str("inbox"),
                pid: 3,
                comm: Text::Bytes(b"iou-wrk-3"),
                opcode: 37,
                op: Some(Text::Str("mkdirat")),
                verdict: Text::Str("allow"),
            },
            EventLine::KvmExit {
                seq: 6,
                tsc: 15,
                mode: Text::Str("inbox"),
                pid: 40,
                comm: Text::Bytes(b"ihmi-l1-vmm"),
                vcpu: 0xffff_8880_0123_4000,
                reason: 10,
                handlers_checked: 76,
                handlers_changed: 0,
                verdict: Text::Str("allow"),
            },
            EventLine::Integrity {
                seq: 7,
                tsc: 16,
                mode: Text::Str("inbox"),
                property: Text::Str("kvm_exit_handlers"),
                index: 10,
                address: 0xffff_ffff_81c4_7990,
                expected: 0xffff_ffff_8106_1000,
                found: 0xffff_ffff_c000_0000,
                what: None,
            },
            EventLine::L2Map {
                seq: 8,
                tsc: 17,
                mode: Text::Str("inbox"),
                pid: 40,
                comm: Text::Bytes(b"ihmi-l1-vmm"),
                vcpu: 0xffff_8880_0123_4000,
                gfn: 0x200,
                pfn: 0x106e,
                hva: 0x7f00_0020_0000,
                level: 1,
                memory: Text::Str("kernel-image"),
                verdict: Text::Str("allow"),
            },
            EventLine::Integrity {
                seq: 9,
                tsc: 18,
                mode: Text::Str("inbox"),
                property: Text::Str("l2_memory"),
                index: 0x200,
                address: 0x20_0000,
                expected: 0x7f00_0020_0000,
                found: 0x106_e000,
                what: Some(Text::Str("kernel-image")),
            },
        ];
        for (i, e) in events.iter().enumerate() {
            let s = line(e);
            let back: EventLine<String> =
                serde_json::from_str(&s).unwrap_or_else(|err| panic!("{s}: {err}"));
            assert_eq!(back.seq(), i as u64);
            let outbox = s.replace("\"inbox\"", "\"outbox\"");
            let other: EventLine<String> = serde_json::from_str(&outbox).unwrap();
            assert_ne!(back, other);
            assert_eq!(back.observation(false), other.observation(false), "{s}");
        }
        let syscall = line(&events[0]);
        assert!(
            syscall.starts_with(r#"{"event":"syscall","seq":0"#),
            "{syscall}"
        );
        assert!(!line(&events[1]).contains("truncated"));
        assert!(syscall.contains(r#""args":[1,2,3],"exec_mapping":true,"verdict""#));
        assert!(!line(&events[1]).contains("exec_mapping"));
        // A digest kept as words prints as the bytes of each, little-endian, in order.
        let exec = line(&events[2]);
        let digest = std::format!(
            "efcdab8967452301{}{}ffffffffffffffff",
            "0".repeat(16),
            "0".repeat(16)
        );
        assert!(
            exec.contains(&std::format!(r#""sha256":"{digest}","verdict""#)),
            "{exec}"
        );
        let a: EventLine<String> = serde_json::from_str(&syscall).unwrap();
        let b: EventLine<String> =
            serde_json::from_str(&syscall.replace("[1,2,3]", "[4,5,6]")).unwrap();
        assert_ne!(a.observation(false), b.observation(false));
        assert_eq!(a.observation(true), b.observation(true));
        assert!(serde_json::from_str::<EventLine<String>>(r#"{"event":"nope","seq":0}"#).is_err());
    }
}
