//! The monitor's event lines in a run's output (`event| {json}`, printed by L0 as it drains the
//! monitor's ring), and the check that two runs of the same workload saw the same events.

use anyhow::{bail, Context, Result};
use ihmi_wire::EventLine;

const PREFIX: &str = "event| ";

/// The events in a run's output, in order, read into the type L0 writes them from.
pub fn parse(output: &str) -> Result<Vec<EventLine<String>>> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix(PREFIX))
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
    for json in output.lines().filter_map(|l| l.strip_prefix(PREFIX)) {
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

/// Succeeds when both outputs hold the same events (sequence numbers, processes, system calls and
/// their arguments, verdicts), but for the arguments when `args_aside`; says where they first differ
/// otherwise.
pub fn same_stream(
    a_name: &str,
    a: &str,
    b_name: &str,
    b: &str,
    args_aside: bool,
) -> Result<usize> {
    let (ea, eb) = (observations(a, args_aside)?, observations(b, args_aside)?);
    if ea.is_empty() {
        bail!("{a_name} printed no events");
    }
    for (i, (x, y)) in ea.iter().zip(&eb).enumerate() {
        if x != y {
            bail!("event {i} differs: {a_name} saw {x:?}, {b_name} saw {y:?}");
        }
    }
    if ea.len() != eb.len() {
        bail!(
            "{a_name} printed {} events, {b_name} {}",
            ea.len(),
            eb.len()
        );
    }
    Ok(ea.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ihmi_wire::{Json, Text};

    /// A system-call event line as L0 writes it.
    fn syscall(mode: &str, tsc: u64, nr: u64, args: [u64; 3]) -> String {
        let e = EventLine::Syscall {
            seq: 0,
            tsc,
            mode: Text::Str(mode),
            pid: 1,
            comm: Text::Bytes(b"init"),
            nr,
            name: None,
            args,
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
        assert_eq!(same_stream("sim", &a, "sim-outbox", &b, false).unwrap(), 1);
        let other = syscall("outbox", 9, 1, [1, 2, 3]);
        let err = same_stream("sim", &a, "sim-outbox", &other, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("event 0 differs"), "{err}");
        // The arguments may differ when the pair sets them aside; nothing else may.
        let args = syscall("outbox", 9, 39, [4, 5, 6]);
        assert!(same_stream("sim", &a, "sim-outbox", &args, false).is_err());
        assert_eq!(
            same_stream("sim", &a, "sim-outbox", &args, true).unwrap(),
            1
        );
        assert!(same_stream("sim", &a, "sim-outbox", &other, true).is_err());
        let longer = format!("{b}{b}");
        assert!(same_stream("sim", &a, "sim-outbox", &longer, false).is_err());
        assert!(
            same_stream("sim", "", "sim-outbox", "", false).is_err(),
            "no events proves nothing"
        );
        assert!(observations("event| {oops", false).is_err());
    }
}
