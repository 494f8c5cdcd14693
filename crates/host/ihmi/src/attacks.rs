//! `ihmi attacks`: the attack suite's report. Each attack scenario ends with one `attack|` line of
//! JSON that L0 prints on port 0xE9 (which only L0 can write) after judging the run; this turns those
//! lines into a table or JSON lines.

use std::fmt::Write as _;

use anyhow::{Context, Result};

/// The prefix of L0's verdict line for an attack.
const PREFIX: &str = "attack| ";

/// One attack's outcome, as L0 reported it (or as `ihmi` found the run when L0 could not report): the
/// type L0's judge writes the line from.
pub type AttackReport = ihmi_wire::AttackLine<String>;

/// A run that produced no verdict line: nothing is claimed.
pub fn missing(attack: &str, item: u64, why: &str) -> AttackReport {
    AttackReport {
        attack: attack.to_string(),
        item,
        blocked: false,
        reported: false,
        monitor_intact: false,
        detail: format!("no verdict from L0: {why}"),
    }
}

/// The JSON line `ihmi attacks --json` prints: L0's line, re-encoded.
pub fn to_json(r: &AttackReport) -> String {
    serde_json::to_string(r).expect("an attack report is plain data")
}

/// L0's verdict line in the E9 output of one run. The last one counts; a malformed one is an error.
pub fn parse(e9: &str) -> Result<Option<AttackReport>> {
    let Some(line) = e9.lines().rev().find_map(|l| l.strip_prefix(PREFIX)) else {
        return Ok(None);
    };
    serde_json::from_str(line)
        .with_context(|| format!("bad attack line: {line}"))
        .map(Some)
}

/// The table `ihmi attacks` prints.
pub fn table(reports: &[AttackReport]) -> String {
    let yes = |b: bool| if b { "yes" } else { "NO" };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>2}  {:<20} {:<8} {:<9} {:<15} defence and what happened",
        "#", "attack", "blocked", "reported", "monitor intact"
    );
    for r in reports {
        let _ = writeln!(
            out,
            "{:>2}  {:<20} {:<8} {:<9} {:<15} {}",
            r.item,
            r.attack,
            yes(r.blocked),
            yes(r.reported),
            yes(r.monitor_intact),
            r.detail
        );
    }
    let passed = reports.iter().filter(|r| r.passed()).count();
    let _ = writeln!(
        out,
        "{passed} of {} attacks blocked and reported, with the monitor intact afterwards",
        reports.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"attack| {"attack":"forged-pte","item":1,"blocked":true,"reported":true,"monitor_intact":true,"detail":"monitor frames are not present in view 0; EPT violation: gpa=0xf801000 (monitor)"}"#;

    #[test]
    fn parses_l0_line_and_prints_the_issue_format() {
        let e9 = format!("noise\nattack| not this one\n{LINE}\nIHMI-PASS attack-forged-pte\n");
        let r = parse(&e9).unwrap().unwrap();
        assert_eq!(r.attack, "forged-pte");
        assert_eq!(r.item, 1);
        assert!(r.passed());
        let json = to_json(&r);
        assert_eq!(parse(&format!("{PREFIX}{json}")).unwrap(), Some(r.clone()));
        assert!(table(&[r]).contains("1 of 1 attacks"));
    }

    #[test]
    fn missing_or_malformed_lines_claim_nothing() {
        assert_eq!(parse("IHMI-FAIL x: boom\n").unwrap(), None);
        assert!(parse("attack| {\"attack\":\"x\"}\n").is_err());
        assert!(parse("attack| {not json\n").is_err());
        let m = missing("cr3-switch", 2, "timeout");
        assert!(!m.passed() && !m.blocked && !m.reported && !m.monitor_intact);
        assert!(table(&[m]).contains("0 of 1 attacks"));
    }
}
