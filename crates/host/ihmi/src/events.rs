//! The monitor's event lines in a run's output (`event| {json}`, printed by L0 as it drains the
//! monitor's ring), and the check that two runs of the same workload saw the same events.

use anyhow::{bail, Context, Result};
use serde_json::Value;

const PREFIX: &str = "event| ";

/// Fields that say how or when an event was observed rather than what happened in the guest.
const OBSERVATION_FIELDS: &[&str] = &["tsc", "mode"];

/// The events in a run's output, in order, each without its observation fields and the `ignored` ones.
pub fn observations(output: &str, ignored: &[&str]) -> Result<Vec<Value>> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix(PREFIX))
        .map(|json| {
            let mut v: Value =
                serde_json::from_str(json).with_context(|| format!("bad event line: {json}"))?;
            let obj = v
                .as_object_mut()
                .with_context(|| format!("event is not an object: {json}"))?;
            for f in OBSERVATION_FIELDS.iter().chain(ignored) {
                obj.remove(*f);
            }
            Ok(v)
        })
        .collect()
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
        serde_json::from_str::<Value>(json).with_context(|| format!("bad event line: {json}"))?;
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
/// their arguments, verdicts), but for the `ignored` fields; says where they first differ otherwise.
pub fn same_stream(
    a_name: &str,
    a: &str,
    b_name: &str,
    b: &str,
    ignored: &[&str],
) -> Result<usize> {
    let (ea, eb) = (observations(a, ignored)?, observations(b, ignored)?);
    if ea.is_empty() {
        bail!("{a_name} printed no events");
    }
    for (i, (x, y)) in ea.iter().zip(&eb).enumerate() {
        if x != y {
            bail!("event {i} differs: {a_name} saw {x}, {b_name} saw {y}");
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

    const IN: &str = "guest| x\nevent| {\"seq\":0,\"tsc\":5,\"mode\":\"inbox\",\"event\":\"syscall\",\"pid\":1,\"nr\":39}\n";
    const OUT: &str = "event| {\"seq\":0,\"tsc\":9,\"mode\":\"outbox\",\"event\":\"syscall\",\"pid\":1,\"nr\":39}\n";

    #[test]
    fn events_go_to_the_file_as_json_lines_with_the_drop_count() {
        let dir = std::env::temp_dir().join(format!("ihmi-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let out = format!("{IN}{OUT}monitor: 2 events, 3 dropped\n");
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
            .all(|l| serde_json::from_str::<Value>(l).is_ok()));
        assert_eq!(write_events("nothing\n", &path).unwrap().dropped, None);
        assert!(write_events("event| {broken\n", &path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn streams_compare_without_time_and_mode() {
        assert_eq!(same_stream("sim", IN, "sim-outbox", OUT, &[]).unwrap(), 1);
        let other = OUT.replace("\"nr\":39", "\"nr\":1");
        let err = same_stream("sim", IN, "sim-outbox", &other, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("event 0 differs"), "{err}");
        // A field the pair ignores may differ; the others may not.
        assert_eq!(
            same_stream("sim", IN, "sim-outbox", &other, &["nr"]).unwrap(),
            1
        );
        let longer = format!("{OUT}{OUT}");
        assert!(same_stream("sim", IN, "sim-outbox", &longer, &[]).is_err());
        assert!(
            same_stream("sim", "", "sim-outbox", "", &[]).is_err(),
            "no events proves nothing"
        );
        assert!(observations("event| {oops", &[]).is_err());
    }
}
