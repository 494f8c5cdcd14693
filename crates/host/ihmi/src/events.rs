//! The monitor's event lines in a run's output (`event| {json}`, printed by L0 as it drains the
//! monitor's ring), and the check that two runs of the same workload saw the same events.

use anyhow::{bail, Context, Result};
use serde_json::Value;

const PREFIX: &str = "event| ";

/// Fields that say how or when an event was observed rather than what happened in the guest.
const OBSERVATION_FIELDS: &[&str] = &["tsc", "mode"];

/// The events in a run's output, in order, each without its observation fields.
pub fn observations(output: &str) -> Result<Vec<Value>> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix(PREFIX))
        .map(|json| {
            let mut v: Value =
                serde_json::from_str(json).with_context(|| format!("bad event line: {json}"))?;
            let obj = v
                .as_object_mut()
                .with_context(|| format!("event is not an object: {json}"))?;
            for f in OBSERVATION_FIELDS {
                obj.remove(*f);
            }
            Ok(v)
        })
        .collect()
}

/// Succeeds when both outputs hold the same events (sequence numbers, processes, system calls and
/// their arguments, verdicts); says where they first differ otherwise.
pub fn same_stream(a_name: &str, a: &str, b_name: &str, b: &str) -> Result<usize> {
    let (ea, eb) = (observations(a)?, observations(b)?);
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
    fn streams_compare_without_time_and_mode() {
        assert_eq!(same_stream("sim", IN, "sim-outbox", OUT).unwrap(), 1);
        let other = OUT.replace("\"nr\":39", "\"nr\":1");
        let err = same_stream("sim", IN, "sim-outbox", &other)
            .unwrap_err()
            .to_string();
        assert!(err.contains("event 0 differs"), "{err}");
        let longer = format!("{OUT}{OUT}");
        assert!(same_stream("sim", IN, "sim-outbox", &longer).is_err());
        assert!(
            same_stream("sim", "", "sim-outbox", "").is_err(),
            "no events proves nothing"
        );
        assert!(observations("event| {oops").is_err());
    }
}
