//! The monitor's event lines in a run's output (`event| {json}`, printed by L0 as it drains the
//! monitor's ring), and the check that two runs of the same workload saw the same events.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use ihmi_wire::EventLine;

const PREFIX: &str = "event| ";

/// The JSON of each event line in a run's output, in order.
fn event_lines(output: &str) -> impl Iterator<Item = &str> {
    output.lines().filter_map(|l| l.strip_prefix(PREFIX))
}

/// The events in a run's output, in order, read into the type L0 writes them from.
pub fn parse(output: &str) -> Result<Vec<EventLine<String>>> {
    event_lines(output)
        .map(|json| serde_json::from_str(json).with_context(|| format!("bad event line: {json}")))
        .collect()
}

/// The events in a run's output, each without how and when it was observed (and without its
/// arguments when `args_aside`).
pub fn observations(output: &str, args_aside: bool) -> Result<Vec<EventLine<String>>> {
    Ok(parse(output)?
        .iter()
        .map(|e| e.observation(args_aside))
        .collect())
}

/// What a run's monitor reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSummary {
    /// Event lines in the output.
    pub events: usize,
    /// Events the monitor's ring dropped, as L0 counted them (None if the run never said).
    pub dropped: Option<u64>,
}

/// Writes the run's events to `path`, one JSON object per line, exactly as L0 printed them, and says
/// how many there were and how many the ring dropped.
pub fn write_events(output: &str, path: &std::path::Path) -> Result<EventSummary> {
    let mut text = String::new();
    let mut events = 0;
    for json in event_lines(output) {
        serde_json::from_str::<EventLine<String>>(json)
            .with_context(|| format!("bad event line: {json}"))?;
        text.push_str(json);
        text.push('\n');
        events += 1;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(EventSummary {
        events,
        dropped: dropped(output),
    })
}

/// L0's count of dropped events, from its `monitor: N events, M dropped` line (the last one).
pub fn dropped(output: &str) -> Option<u64> {
    output.lines().rev().find_map(|l| {
        let rest = l.strip_prefix("monitor: ")?;
        let (_, after) = rest.split_once(" events, ")?;
        after.strip_suffix(" dropped")?.parse().ok()
    })
}

/// How two runs of the same workload must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agreement {
    /// A guest that does the same thing in the same order every time (the test guest): for every
    /// process, the same events in the same order, arguments included.
    Exact,
    /// A guest with a scheduler, timer ticks and asynchronous signals (Linux), where a VM exit's
    /// length moves where a tick lands: which process runs next, and whether SIGCHLD's handler runs
    /// before or after its parent's `wait4` (and so whether that `wait4` is interrupted and made
    /// again), differ between two good runs. For every process: the same process creations and
    /// program starts in the same order (pid, parent, name, file, verdict), the same system calls
    /// (by number, with their verdicts) as a set, and the same refused requests in order; arguments
    /// (user pointers, randomised at every boot) aside. The exits of KVM's guest (the in-hypervisor
    /// monitor's events) in order, but for the timer's interrupts, with the vCPU's address aside.
    Scheduled,
}

impl Agreement {
    /// What the check sets aside, for its PASS line.
    pub const fn aside(self) -> &'static str {
        match self {
            Self::Exact => "seq, tsc and mode aside",
            Self::Scheduled => {
                "starts and KVM's exits in order, calls as a set, per process; seq, tsc, mode, args, vCPU addresses and timer-interrupt exits aside"
            }
        }
    }
}

/// Succeeds when both outputs hold the same events process by process, as `agreement` says (the
/// order *between* processes is the scheduler's, and the sequence numbers that count in it are set
/// aside with it); says where the runs first differ otherwise.
pub fn same_stream(
    a_name: &str,
    a: &str,
    b_name: &str,
    b: &str,
    agreement: Agreement,
) -> Result<usize> {
    let args_aside = agreement == Agreement::Scheduled;
    let (ea, eb) = (observations(a, args_aside)?, observations(b, args_aside)?);
    if ea.is_empty() {
        bail!("{a_name} printed no events");
    }
    let (pa, pb) = (by_process(&ea), by_process(&eb));
    for (pid, xs) in &pa {
        let Some(ys) = pb.get(pid) else {
            bail!(
                "{b_name} saw nothing of {}, which {a_name} saw {} events of",
                who(*pid),
                xs.len()
            );
        };
        match agreement {
            Agreement::Exact => same_sequence(xs, ys, &who(*pid), a_name, b_name)?,
            Agreement::Scheduled => {
                same_sequence(&starts(xs), &starts(ys), &who(*pid), a_name, b_name)?;
                let (ca, cb) = (calls(xs), calls(ys));
                if let Some((nr, v)) = ca.difference(&cb).next() {
                    bail!(
                        "{}: {a_name} saw system call {nr} ({v}), {b_name} did not",
                        who(*pid)
                    );
                }
                if let Some((nr, v)) = cb.difference(&ca).next() {
                    bail!(
                        "{}: {b_name} saw system call {nr} ({v}), {a_name} did not",
                        who(*pid)
                    );
                }
            }
        }
    }
    if let Some(pid) = pb.keys().find(|p| !pa.contains_key(p)) {
        bail!("{a_name} saw nothing of {}, which {b_name} saw", who(*pid));
    }
    Ok(ea.len())
}

fn who(pid: Option<u32>) -> String {
    pid.map_or("the refused requests".to_string(), |p| format!("pid {p}"))
}

/// The same events in the same order.
fn same_sequence(
    xs: &[&EventLine<String>],
    ys: &[&EventLine<String>],
    whose: &str,
    a_name: &str,
    b_name: &str,
) -> Result<()> {
    for (i, (x, y)) in xs.iter().zip(ys).enumerate() {
        if x != y {
            bail!("event {i} of {whose} differs: {a_name} saw {x:?}, {b_name} saw {y:?}");
        }
    }
    if xs.len() != ys.len() {
        bail!(
            "{a_name} saw {} events of {whose}, {b_name} {}",
            xs.len(),
            ys.len()
        );
    }
    Ok(())
}

/// EXIT_REASON_EXTERNAL_INTERRUPT: where a timer tick lands while KVM's guest runs.
const EXTERNAL_INTERRUPT: u64 = 1;

/// A process's events but its system calls: its creation, its program starts, refused requests, and
/// the exits of KVM's guest its KVM handled (the in-hypervisor monitor's) but those a timer
/// interrupt made, which land where a tick does.
fn starts<'e>(events: &[&'e EventLine<String>]) -> Vec<&'e EventLine<String>> {
    events
        .iter()
        .copied()
        .filter(|e| match e {
            EventLine::Syscall { .. } => false,
            EventLine::KvmExit { reason, .. } => *reason & 0xffff != EXTERNAL_INTERRUPT,
            _ => true,
        })
        .collect()
}

/// A process's system calls, by number and verdict.
fn calls(events: &[&EventLine<String>]) -> BTreeSet<(u64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            EventLine::Syscall { nr, verdict, .. } => Some((*nr, verdict.clone())),
            _ => None,
        })
        .collect()
}

/// The events of each process (and the refused requests, under `None`), each list in stream order.
fn by_process(events: &[EventLine<String>]) -> BTreeMap<Option<u32>, Vec<&EventLine<String>>> {
    let mut map = BTreeMap::<_, Vec<_>>::new();
    for e in events {
        map.entry(e.pid()).or_default().push(e);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use ihmi_wire::{Json, Text};

    /// A system-call event line as L0 writes it.
    fn syscall(mode: &str, tsc: u64, nr: u64, args: [u64; 3]) -> String {
        syscall_of(1, 0, mode, tsc, nr, args)
    }

    fn syscall_of(pid: u32, seq: u64, mode: &str, tsc: u64, nr: u64, args: [u64; 3]) -> String {
        let e = EventLine::Syscall {
            seq,
            tsc,
            mode: Text::Str(mode),
            pid,
            comm: Text::Bytes(b"init"),
            entry: Text::Str("syscall"),
            nr,
            name: None,
            args,
            exec_mapping: false,
            verdict: Text::Str("allow"),
        };
        format!("event| {}\n", Json(&e))
    }

    #[test]
    fn events_go_to_the_file_as_json_lines_with_the_drop_count() {
        let dir = std::env::temp_dir().join(format!("ihmi-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let out = format!(
            "guest| x\n{}{}monitor: 2 events, 3 dropped\n",
            syscall("inbox", 5, 39, [0; 3]),
            syscall("outbox", 9, 39, [0; 3])
        );
        let s = write_events(&out, &path).unwrap();
        assert_eq!(
            s,
            EventSummary {
                events: 2,
                dropped: Some(3)
            }
        );
        let written = std::fs::read_to_string(&path).unwrap();
        assert_eq!(written.lines().count(), 2);
        assert!(written
            .lines()
            .all(|l| serde_json::from_str::<EventLine<String>>(l).is_ok()));
        assert_eq!(write_events("nothing\n", &path).unwrap().dropped, None);
        assert!(write_events("event| {broken\n", &path).is_err());
        assert!(write_events("event| {\"event\":\"syscall\"}\n", &path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn streams_compare_without_time_and_mode() {
        let a = syscall("inbox", 5, 39, [1, 2, 3]);
        let b = syscall("outbox", 9, 39, [1, 2, 3]);
        assert_eq!(
            same_stream("sim", &a, "sim-outbox", &b, Agreement::Exact).unwrap(),
            1
        );
        let other = syscall("outbox", 9, 1, [1, 2, 3]);
        let err = same_stream("sim", &a, "sim-outbox", &other, Agreement::Exact)
            .unwrap_err()
            .to_string();
        assert!(err.contains("event 0 of pid 1 differs"), "{err}");
        // The arguments may differ when the pair sets them aside; nothing else may.
        let args = syscall("outbox", 9, 39, [4, 5, 6]);
        assert!(same_stream("sim", &a, "sim-outbox", &args, Agreement::Exact).is_err());
        assert_eq!(
            same_stream("sim", &a, "sim-outbox", &args, Agreement::Scheduled).unwrap(),
            1
        );
        assert!(same_stream("sim", &a, "sim-outbox", &other, Agreement::Scheduled).is_err());
        let longer = format!("{b}{b}");
        assert!(same_stream("sim", &a, "sim-outbox", &longer, Agreement::Exact).is_err());
        assert!(
            same_stream("sim", "", "sim-outbox", "", Agreement::Exact).is_err(),
            "no events proves nothing"
        );
        assert!(observations("event| {oops", false).is_err());
    }

    /// The in-hypervisor monitor's pair: KVM's exits in order, but for where the timer's interrupts
    /// landed and where KVM allocated the vCPU.
    #[test]
    fn kvm_exits_compare_in_order_without_timer_interrupts_and_vcpu_addresses() {
        let exit = |mode: &str, vcpu: u64, reason: u64| {
            let e = EventLine::KvmExit {
                seq: 0,
                tsc: 0,
                mode: Text::Str(mode),
                pid: 32,
                comm: Text::Bytes(b"ihmi-l1-vmm"),
                vcpu,
                reason,
                handlers_checked: 76,
                handlers_changed: 0,
                verdict: Text::Str("allow"),
            };
            format!("event| {}\n", Json(&e))
        };
        let a = [exit("inbox", 0x1000, 0), exit("inbox", 0x1000, 10)].concat();
        let b = [
            exit("outbox", 0x2000, 0),
            exit("outbox", 0x2000, 1),
            exit("outbox", 0x2000, 10),
        ]
        .concat();
        assert!(same_stream("ihmi-kvm", &a, "ihmi-kvm-outbox", &b, Agreement::Scheduled).is_ok());
        let other = [exit("outbox", 0x2000, 10), exit("outbox", 0x2000, 0)].concat();
        assert!(same_stream("ihmi-kvm", &a, "out", &other, Agreement::Scheduled).is_err());
        let fewer = exit("outbox", 0x2000, 0);
        assert!(same_stream("ihmi-kvm", &a, "out", &fewer, Agreement::Scheduled).is_err());
    }

    #[test]
    fn streams_compare_per_process_so_the_scheduler_may_interleave_them() {
        let line = |pid, seq, nr| syscall_of(pid, seq, "inbox", seq, nr, [0; 3]);
        // pid 1 reads while pid 23 starts, in either order.
        let a = [line(1, 0, 0), line(23, 1, 273), line(23, 2, 39)].concat();
        let b = [line(23, 0, 273), line(1, 1, 0), line(23, 2, 39)].concat();
        assert_eq!(
            same_stream("in", &a, "out", &b, Agreement::Exact).unwrap(),
            3
        );
        // But one process's own order, a missing event or a missing process is a difference.
        let swapped = [line(1, 0, 0), line(23, 1, 39), line(23, 2, 273)].concat();
        let err = same_stream("in", &a, "out", &swapped, Agreement::Exact)
            .unwrap_err()
            .to_string();
        assert!(err.contains("event 0 of pid 23 differs"), "{err}");
        let short = [line(1, 0, 0), line(23, 1, 273)].concat();
        let err = same_stream("in", &a, "out", &short, Agreement::Exact)
            .unwrap_err()
            .to_string();
        assert!(err.contains("saw 2 events of pid 23, out 1"), "{err}");
        let other = [line(1, 0, 0), line(24, 1, 273), line(24, 2, 39)].concat();
        let err = same_stream("in", &a, "out", &other, Agreement::Exact)
            .unwrap_err()
            .to_string();
        assert!(err.contains("out saw nothing of pid 23"), "{err}");
        let extra = [a.clone(), line(25, 3, 39)].concat();
        assert!(same_stream("in", &a, "out", &extra, Agreement::Exact).is_err());
    }

    #[test]
    fn a_scheduled_guest_agrees_on_starts_in_order_and_calls_as_a_set() {
        let call = |pid, nr| syscall_of(pid, 0, "inbox", 0, nr, [0; 3]);
        let exec = |pid, file: &str, verdict: &str| {
            let e = EventLine::Exec {
                seq: 0,
                tsc: 0,
                mode: Text::Str("inbox"),
                pid,
                ppid: 1,
                comm: Text::Bytes(b"init"),
                filename: Text::Str(file),
                filename_truncated: false,
                sha256: None,
                unhashed: None,
                verdict: Text::Str(verdict),
            };
            format!("event| {}\n", Json(&e))
        };
        let (wait4, sigreturn) = (61, 15);
        let a = [
            exec(2, "/bin/ls", "allow"),
            call(1, wait4),
            call(1, sigreturn),
            exec(3, "/bin/x", "deny"),
        ]
        .concat();
        // SIGCHLD's handler before the wait4, and the wait4 made twice: the same agreement.
        let b = [
            exec(2, "/bin/ls", "allow"),
            call(1, sigreturn),
            call(1, wait4),
            call(1, wait4),
            exec(3, "/bin/x", "deny"),
        ]
        .concat();
        assert!(same_stream("in", &a, "out", &b, Agreement::Exact).is_err());
        assert_eq!(
            same_stream("in", &a, "out", &b, Agreement::Scheduled).unwrap(),
            4
        );
        // A call only one run saw, another verdict, or a program start missing: a difference.
        let c = [
            exec(2, "/bin/ls", "allow"),
            call(1, wait4),
            exec(3, "/bin/x", "deny"),
        ]
        .concat();
        let err = same_stream("in", &a, "out", &c, Agreement::Scheduled)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pid 1: in saw system call 15"), "{err}");
        let d = [
            exec(2, "/bin/ls", "allow"),
            call(1, wait4),
            call(1, sigreturn),
            exec(3, "/bin/x", "allow"),
        ]
        .concat();
        assert!(same_stream("in", &a, "out", &d, Agreement::Scheduled).is_err());
        let e = [
            call(1, wait4),
            call(1, sigreturn),
            exec(3, "/bin/x", "deny"),
        ]
        .concat();
        assert!(same_stream("in", &a, "out", &e, Agreement::Scheduled).is_err());
    }
}
