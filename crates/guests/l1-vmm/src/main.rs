//! `ihmi-l1-vmm`: the user-space VMM of the Linux guest hypervisor (L1), run by /init. Every line
//! it prints goes to L1's console and to L0's debug port; exit status 0 when the mode finished, 1
//! on an error, 2 on a bad command line.

mod l2;
mod probe;

use std::process::ExitCode;

use ihmi_linux_workload::DebugPort;

const USAGE: &str = "usage: ihmi-l1-vmm --probe [--cpuids N]";

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// The long-mode L2 that makes `cpuids` CPUIDs, touches memory and reports.
    Probe { cpuids: u32 },
}

/// Parses the arguments after the program name; `Err` is what to print above the usage.
fn parse(args: impl IntoIterator<Item = String>) -> Result<Mode, String> {
    let (mut probe, mut cpuids) = (false, None);
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--probe" => probe = true,
            "--cpuids" => {
                let n = args.next().ok_or("--cpuids needs a count")?;
                match n.parse::<u32>() {
                    Ok(n) if n > 0 => cpuids = Some(n),
                    _ => return Err(format!("--cpuids {n}: not a count from 1 to {}", u32::MAX)),
                }
            }
            _ => return Err(format!("unknown argument {arg}")),
        }
    }
    if !probe {
        return Err("no mode given".into());
    }
    let cpuids = cpuids.unwrap_or(ihmi_abi::NESTED_KVM_CPUIDS as u32);
    Ok(Mode::Probe { cpuids })
}

/// L1's console and, when this process may use it, L0's debug port.
#[derive(Debug)]
struct Console(Option<DebugPort>);

impl Console {
    fn open() -> Self {
        match DebugPort::open() {
            Ok(port) => Self(Some(port)),
            Err(e) => {
                eprintln!("ihmi-l1-vmm: warning: no debug port (ioperm: {e}); stdout only");
                Self(None)
            }
        }
    }

    fn line(&self, line: &str) {
        println!("{line}");
        if let Some(port) = &self.0 {
            port.line(line);
        }
    }
}

fn main() -> ExitCode {
    let mode = match parse(std::env::args().skip(1)) {
        Ok(mode) => mode,
        Err(e) => {
            eprintln!("ihmi-l1-vmm: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let console = Console::open();
    let done = match mode {
        Mode::Probe { cpuids } => probe::run(cpuids).map(|report| {
            console.line(&format!("l2: {}", report.l2_line()));
            format!(
                "probe done: L2 ended after {} KVM_RUN returns",
                report.kvm_runs
            )
        }),
    };
    match done {
        Ok(line) => {
            console.line(&format!("ihmi-l1-vmm: {line}"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            console.line(&format!("ihmi-l1-vmm: error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Result<Mode, String> {
        parse(line.split_whitespace().map(String::from))
    }

    #[test]
    fn parses_probe() {
        assert_eq!(args("--probe"), Ok(Mode::Probe { cpuids: 1000 }));
        assert_eq!(args("--cpuids 7 --probe"), Ok(Mode::Probe { cpuids: 7 }));
    }

    #[test]
    fn rejects_bad_command_lines() {
        for bad in [
            "",
            "--cpuids 5",
            "--probe --cpuids",
            "--probe --cpuids 0",
            "--probe -x",
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }
}
