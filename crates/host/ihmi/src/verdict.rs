//! Turning what one Bochs run produced into PASS or FAIL.
//!
//! The verdict comes only from L0's markers on the port-0xE9 stream (Bochs's stdout), which the guest
//! cannot write (L0 traps the port), plus Bochs's own log for crashes. Bochs's exit code says nothing:
//! it is 1 even after a clean "Shutdown" (BRIEF.md section 3). Everything here is pure so it is tested
//! without Bochs.

use std::time::Duration;

/// L0 has checked its result and it is good: `IHMI-PASS <scenario>`.
pub const PASS: &str = "IHMI-PASS";
/// L0 saw something wrong: `IHMI-FAIL <scenario>: <reason>`.
pub const FAIL: &str = "IHMI-FAIL";
/// L0 is about to write "Shutdown" to port 0x8900: `IHMI-END`.
pub const END: &str = "IHMI-END";

/// One marker line from the E9 stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker<'a> {
    Pass { scenario: &'a str },
    Fail { scenario: &'a str, reason: &'a str },
    End,
}

/// Finds the marker in one line, if any. A marker must start the line: L0 prints each one as a line of
/// its own, and this keeps text that merely contains a marker (a relayed guest line, say) from counting.
pub fn parse_marker(line: &str) -> Option<Marker<'_>> {
    let line = line.trim_end_matches(['\r', '\n']);
    for tag in [PASS, FAIL, END] {
        let Some(rest) = line.strip_prefix(tag) else {
            continue;
        };
        if !(rest.is_empty() || rest.starts_with(' ')) {
            continue;
        }
        let rest = rest.trim();
        return Some(match tag {
            PASS => Marker::Pass { scenario: rest },
            FAIL => match rest.split_once(':') {
                Some((scenario, reason)) => Marker::Fail {
                    scenario: scenario.trim(),
                    reason: reason.trim(),
                },
                None => Marker::Fail {
                    scenario: rest,
                    reason: "",
                },
            },
            _ => Marker::End,
        });
    }
    None
}

/// Every marker in `e9`, in order.
pub fn markers(e9: &str) -> impl Iterator<Item = Marker<'_>> {
    e9.lines().filter_map(parse_marker)
}

/// How the Bochs process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Bochs exited by itself, with this code (`None`: killed by a signal).
    Exited(Option<i32>),
    /// `ihmi` killed Bochs because it did not exit within the grace period after a marker.
    KilledAfterMarker,
    /// `ihmi` killed Bochs at the scenario timeout.
    TimedOut(Duration),
}

/// Everything one run produced.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The scenario that was requested.
    pub scenario: &'a str,
    /// Bochs's stdout: port 0xE9 output (plus debugger chatter).
    pub e9: &'a str,
    /// Bochs's log file (`log:` in bochsrc).
    pub log: &'a str,
    /// Bochs's stderr, which carries "Bochs is exiting with the following message".
    pub stderr: &'a str,
    pub exit: Exit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
}

impl Verdict {
    pub fn is_pass(&self) -> bool {
        matches!(self, Verdict::Pass)
    }
}

/// Panic texts Bochs logs when the machine shuts down on purpose (`BX_FATAL` is logged as a panic).
const BENIGN_FATALS: &[&str] = &[
    "Shutdown port: shutdown requested",
    "ACPI control: soft power off",
];

/// The first log line that shows a triple fault. With `reset_on_triple_fault=0` Bochs panics with
/// "exception(): 3rd (N) exception with no resolution"; with 1 it logs an error and resets.
pub fn triple_fault(log: &str) -> Option<&str> {
    log.lines().find(|l| {
        l.contains("exception with no resolution")
            || l.to_ascii_lowercase().contains("triple fault")
    })
}

/// The first log line that is a Bochs panic or fatal error other than an intended shutdown.
pub fn bochs_panic(log: &str) -> Option<&str> {
    log.lines().find(|l| {
        let is_panic = l.contains(">>PANIC<<") || l.contains("FATAL") || is_panic_level(l);
        is_panic && !BENIGN_FATALS.iter().any(|b| l.contains(b))
    })
}

/// Bochs log lines start with the tick count and a level letter: `00213865791p[UNMAP ] ...`.
fn is_panic_level(line: &str) -> bool {
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && line[digits..].starts_with("p[")
}

/// The message Bochs prints on stderr when it quits ("Bochs is exiting with the following message:").
pub fn exit_message(stderr: &str) -> Option<&str> {
    let mut lines = stderr.lines();
    lines.find(|l| l.contains("Bochs is exiting with the following message"))?;
    lines.map(str::trim).find(|l| !l.is_empty())
}

/// Judges one run. FAIL wins over PASS: an L0 FAIL marker, a Bochs panic or a triple fault fails the
/// run even if a PASS marker was printed too.
pub fn judge(o: &Observed<'_>) -> Verdict {
    let all: Vec<Marker<'_>> = markers(o.e9).collect();

    if let Some((scenario, reason)) = all.iter().find_map(|m| match m {
        Marker::Fail { scenario, reason } => Some((*scenario, *reason)),
        _ => None,
    }) {
        let reason = if reason.is_empty() {
            "(no reason given)"
        } else {
            reason
        };
        return Verdict::Fail(format!(
            "L0 reported failure in scenario {scenario}: {reason}"
        ));
    }
    if let Some(line) = triple_fault(o.log) {
        return Verdict::Fail(format!("triple fault: {}", line.trim()));
    }
    if let Some(line) = bochs_panic(o.log) {
        return Verdict::Fail(format!("Bochs panic: {}", line.trim()));
    }
    if let Exit::TimedOut(limit) = o.exit {
        return Verdict::Fail(format!(
            "timed out after {} s without a verdict (raise --timeout if the scenario is just slow)",
            limit.as_secs()
        ));
    }

    let passed: Vec<&str> = all
        .iter()
        .filter_map(|m| match m {
            Marker::Pass { scenario } => Some(*scenario),
            _ => None,
        })
        .collect();
    if passed.contains(&o.scenario) {
        return Verdict::Pass;
    }
    if let Some(other) = passed.first() {
        return Verdict::Fail(format!(
            "L0 passed scenario `{other}`, but `{}` was requested (does L0 read scenario= from its \
             command line?)",
            o.scenario
        ));
    }

    let how = match o.exit {
        Exit::Exited(Some(code)) => format!("Bochs exited with code {code}"),
        Exit::Exited(None) => "Bochs was killed by a signal".to_string(),
        Exit::KilledAfterMarker => "Bochs was stopped after IHMI-END".to_string(),
        Exit::TimedOut(_) => unreachable!("handled above"),
    };
    let why = match exit_message(o.stderr) {
        Some(msg) => format!(" ({msg})"),
        None => String::new(),
    };
    Verdict::Fail(format!("{how}{why} without `{PASS} {}`", o.scenario))
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHUTDOWN_LOG: &str = "00000000000i[      ] Bochs x86 Emulator 2.7\n\
        00213865791p[UNMAP ] >>PANIC<< Shutdown port: shutdown requested\n";
    const SHUTDOWN_STDERR: &str = "=====\nBochs is exiting with the following message:\n\
        [UNMAP ] Shutdown port: shutdown requested\n=====\n";
    const DEBUGGER_NOISE: &str = "Next at t=0\n\
        (0) [0x0000fffffff0] f000:fff0 (unk. ctxt): jmpf 0xf000:e05b          ; ea5be000f0\n";

    fn observe<'a>(scenario: &'a str, e9: &'a str, log: &'a str) -> Observed<'a> {
        Observed {
            scenario,
            e9,
            log,
            stderr: SHUTDOWN_STDERR,
            exit: Exit::Exited(Some(1)),
        }
    }

    #[test]
    fn parses_markers() {
        assert_eq!(
            parse_marker("IHMI-PASS boot\r"),
            Some(Marker::Pass { scenario: "boot" })
        );
        assert_eq!(
            parse_marker("IHMI-FAIL ept-guard: write to guarded page was not trapped"),
            Some(Marker::Fail {
                scenario: "ept-guard",
                reason: "write to guarded page was not trapped"
            })
        );
        assert_eq!(parse_marker("IHMI-END"), Some(Marker::End));
        assert_eq!(parse_marker("(0).[1] IHMI-PASS boot"), None);
        assert_eq!(
            parse_marker("guest| IHMI-PASS boot"),
            None,
            "relayed guest text never counts"
        );
        assert_eq!(parse_marker("IHMI-PASSED boot"), None);
        assert_eq!(parse_marker("l0: booting scenario=boot"), None);
    }

    #[test]
    fn pass() {
        let e9 = format!("{DEBUGGER_NOISE}l0: hello\nIHMI-PASS boot\nIHMI-END\n");
        assert_eq!(judge(&observe("boot", &e9, SHUTDOWN_LOG)), Verdict::Pass);
    }

    #[test]
    fn shutdown_fatal_is_not_a_failure() {
        assert_eq!(bochs_panic(SHUTDOWN_LOG), None);
        let acpi = "00220058792p[ACPI  ] >>PANIC<< ACPI control: soft power off\n";
        assert_eq!(bochs_panic(acpi), None);
        let e9 = "IHMI-PASS boot\nIHMI-END\n";
        assert_eq!(judge(&observe("boot", e9, acpi)), Verdict::Pass);
    }

    #[test]
    fn fail_marker_fails_even_with_pass() {
        let e9 = "IHMI-FAIL boot: VMLAUNCH failed: VmEntryInvalidControlField\nIHMI-PASS boot\n";
        let Verdict::Fail(reason) = judge(&observe("boot", e9, SHUTDOWN_LOG)) else {
            panic!("expected FAIL");
        };
        assert!(reason.contains("VMLAUNCH failed"), "{reason}");
    }

    #[test]
    fn missing_marker_fails() {
        let Verdict::Fail(reason) = judge(&observe("boot", DEBUGGER_NOISE, SHUTDOWN_LOG)) else {
            panic!("expected FAIL");
        };
        assert!(reason.contains("Bochs exited with code 1"), "{reason}");
        assert!(reason.contains("Shutdown port"), "{reason}");
        assert!(reason.contains("IHMI-PASS boot"), "{reason}");
    }

    #[test]
    fn panic_in_log_fails() {
        let log = "00000000000i[      ] x\n\
            00000001234p[CPU0  ] >>PANIC<< VMABORT: host state is broken\n";
        let e9 = "IHMI-PASS boot\n";
        let Verdict::Fail(reason) = judge(&observe("boot", e9, log)) else {
            panic!("expected FAIL");
        };
        assert!(reason.starts_with("Bochs panic:"), "{reason}");
        assert!(reason.contains("VMABORT"), "{reason}");
    }

    #[test]
    fn panic_level_without_tag_and_fatal_text_fail() {
        assert!(bochs_panic("00000001234p[CPU0  ] something\n").is_some());
        assert!(bochs_panic("FATAL: bad thing\n").is_some());
        assert!(bochs_panic("00000001234e[CPU0  ] an error is only reported\n").is_none());
    }

    #[test]
    fn triple_fault_fails() {
        let log =
            "00000123456p[CPU0  ] >>PANIC<< exception(): 3rd (13) exception with no resolution\n";
        let Verdict::Fail(reason) = judge(&observe("boot", "", log)) else {
            panic!("expected FAIL");
        };
        assert!(reason.starts_with("triple fault:"), "{reason}");
    }

    #[test]
    fn scenario_name_mismatch_fails() {
        let e9 = "IHMI-PASS boot\nIHMI-END\n";
        let Verdict::Fail(reason) = judge(&observe("ept-guard", e9, SHUTDOWN_LOG)) else {
            panic!("expected FAIL");
        };
        assert!(reason.contains("passed scenario `boot`"), "{reason}");
        assert!(reason.contains("`ept-guard` was requested"), "{reason}");
        // A prefix of the name is not the name.
        let e9 = "IHMI-PASS ept\n";
        assert!(!judge(&observe("ept-guard", e9, SHUTDOWN_LOG)).is_pass());
    }

    #[test]
    fn timeout_fails_even_with_pass() {
        let mut o = observe("boot", "IHMI-PASS boot\n", "");
        o.exit = Exit::TimedOut(Duration::from_secs(300));
        let Verdict::Fail(reason) = judge(&o) else {
            panic!("expected FAIL");
        };
        assert!(reason.contains("timed out after 300 s"), "{reason}");
    }

    #[test]
    fn killed_after_pass_is_still_pass() {
        let mut o = observe("boot", "IHMI-PASS boot\nIHMI-END\n", "");
        o.exit = Exit::KilledAfterMarker;
        assert_eq!(judge(&o), Verdict::Pass);
    }

    #[test]
    fn exit_message_and_tail() {
        assert_eq!(
            exit_message(SHUTDOWN_STDERR),
            Some("[UNMAP ] Shutdown port: shutdown requested")
        );
        assert_eq!(exit_message("nothing"), None);
        assert_eq!(tail("a\nb\nc\n", 2), ["b", "c"]);
        assert_eq!(tail("a", 5), ["a"]);
    }
}
