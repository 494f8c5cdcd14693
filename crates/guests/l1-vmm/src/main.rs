//! `ihmi-l1-vmm`: the user-space VMM of the Linux guest hypervisor (L1), run by /init. Every line
//! it prints goes to L1's console and to L0's debug port; exit status 0 when the mode finished, 1
//! on an error, 2 on a bad command line.

mod l2;
mod linux;
mod probe;
mod vcpu;

use std::process::ExitCode;

use ihmi_linux_workload::DebugPort;

const USAGE: &str =
    "usage: ihmi-l1-vmm --probe [--cpuids N] [--attack-alias PHYS] [--attack-vmfunc]
       ihmi-l1-vmm --linux BZIMAGE INITRD [--mem MIB] [--cmdline LINE] [--status SECS]";

/// L2's kernel command line when `--cmdline` does not give one: its console on COM1 (and early
/// output there too), a reset on panic that the VMM sees. (No `nokaslr`: a kernel built without
/// KASLR passes the word to its /init as an argument.)
const DEFAULT_CMDLINE: &str = "console=ttyS0 earlycon=uart8250,io,0x3f8 panic=-1 reboot=k";

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// The long-mode L2 that makes `cpuids` CPUIDs, touches memory and reports; with `alias`, L1's
    /// compromised root's VMM, which first gives it the L1 page that holds this physical address
    /// and has it write there (the `kvm-l2-map` attack); with `vmfunc`, a guest that first executes
    /// VMFUNC (the `kvm-l2-vmfunc` attack).
    Probe {
        cpuids: u32,
        alias: Option<u64>,
        vmfunc: bool,
    },
    /// A Linux L2, run until its /init powers it off.
    Linux(linux::Boot),
}

/// Parses the arguments after the program name; `Err` is what to print above the usage.
fn parse(args: impl IntoIterator<Item = String>) -> Result<Mode, String> {
    let (mut probe, mut cpuids, mut linux, mut alias) = (false, None, None, None);
    let mut vmfunc = false;
    let (mut mem_mib, mut cmdline, mut status_secs) = (None, None, None);
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
            "--attack-vmfunc" => vmfunc = true,
            "--attack-alias" => {
                let a = args
                    .next()
                    .ok_or("--attack-alias needs a physical address")?;
                match a.strip_prefix("0x").map(|h| u64::from_str_radix(h, 16)) {
                    Some(Ok(pa)) if pa % 0x1000 <= 0x1000 - 4 => alias = Some(pa),
                    _ => {
                        return Err(format!(
                            "--attack-alias {a}: not a hex physical address (0x...) with 4 bytes left in its page"
                        ))
                    }
                }
            }
            "--linux" => {
                let kernel = args
                    .next()
                    .ok_or("--linux needs a bzImage and an initramfs")?;
                let initrd = args
                    .next()
                    .ok_or("--linux needs an initramfs after the bzImage")?;
                linux = Some((kernel, initrd));
            }
            "--mem" => {
                let n = args.next().ok_or("--mem needs a size in MiB")?;
                match n.parse::<u64>() {
                    Ok(n) if linux::MEM_MIB.contains(&n) => mem_mib = Some(n),
                    _ => {
                        let (lo, hi) = linux::MEM_MIB.into_inner();
                        return Err(format!("--mem {n}: not a size from {lo} to {hi} MiB"));
                    }
                }
            }
            "--cmdline" => cmdline = Some(args.next().ok_or("--cmdline needs a line")?),
            "--status" => {
                let n = args.next().ok_or("--status needs seconds")?;
                match n.parse::<u64>() {
                    Ok(n) if n > 0 => status_secs = Some(n),
                    _ => return Err(format!("--status {n}: not a number of seconds from 1")),
                }
            }
            _ => return Err(format!("unknown argument {arg}")),
        }
    }
    match (probe, linux) {
        (true, None) if mem_mib.is_none() && cmdline.is_none() && status_secs.is_none() => {
            let cpuids = cpuids.unwrap_or(ihmi_abi::NESTED_KVM_CPUIDS as u32);
            Ok(Mode::Probe {
                cpuids,
                alias,
                vmfunc,
            })
        }
        (false, Some((kernel, initrd))) if cpuids.is_none() && alias.is_none() && !vmfunc => {
            Ok(Mode::Linux(linux::Boot {
                kernel,
                initrd,
                cmdline: cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.into()),
                mem_mib: mem_mib.unwrap_or(linux::DEFAULT_MEM_MIB),
                status_secs: status_secs.unwrap_or(linux::DEFAULT_STATUS_SECS),
            }))
        }
        (true, Some(_)) => Err("--probe and --linux are two modes: give one".into()),
        (false, None) => Err("no mode given".into()),
        (true, None) => Err("--mem, --cmdline and --status are for --linux".into()),
        (false, Some(_)) => {
            Err("--cpuids, --attack-alias and --attack-vmfunc are for --probe".into())
        }
    }
}

/// L1's console and, when this process may use it, L0's debug port.
#[derive(Debug)]
pub struct Console(Option<DebugPort>);

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

    /// `prefix` and `text` as one line on L1's console, and on L0's debug port in pieces that
    /// each fit one of L0's lines, every one with the prefix: text from L2 never reaches L0
    /// without the prefix that says it is L2's.
    pub fn line(&self, prefix: &str, text: &str) {
        println!("{prefix}{text}");
        if let Some(port) = &self.0 {
            for piece in debug_pieces(prefix, text) {
                port.line(&piece);
            }
        }
    }
}

/// `text` cut at character boundaries into pieces of at most [`ihmi_abi::DEBUG_LINE_MAX`] bytes
/// with `prefix` before each; one piece for an empty text.
fn debug_pieces(prefix: &str, text: &str) -> Vec<String> {
    let room = ihmi_abi::DEBUG_LINE_MAX.saturating_sub(prefix.len()).max(4);
    let mut pieces = Vec::new();
    let mut rest = text;
    loop {
        let mut cut = rest.len().min(room);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        pieces.push(format!("{prefix}{}", &rest[..cut]));
        rest = &rest[cut..];
        if rest.is_empty() {
            return pieces;
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
        Mode::Probe {
            cpuids,
            alias,
            vmfunc,
        } => probe::run(cpuids, alias, vmfunc).map(|report| {
            console.line(ihmi_abi::NESTED_L2_DEBUG, &report.l2_line());
            if vmfunc {
                console.line(
                    ihmi_abi::NESTED_L2_DEBUG,
                    &format!("ihmi-l2: VMFUNC raised #UD, times: {}", report.ud_faults),
                );
            }
            format!(
                "probe done: L2 ended after {} KVM_RUN returns",
                report.kvm_runs
            )
        }),
        Mode::Linux(boot) => {
            console.line(
                ihmi_abi::NESTED_L1_VMM,
                &format!(
                    "booting {} with {} ({} MiB): {}",
                    boot.kernel, boot.initrd, boot.mem_mib, boot.cmdline
                ),
            );
            linux::run(&boot, &console).map(|r| {
                format!(
                    "linux done: L2 powered off after {} KVM_RUN returns and {} ms of L1's time; \
                     {} console lines, {} debug-port lines, {} accesses to absent ports, {} to \
                     absent MMIO",
                    r.kvm_runs, r.millis, r.console_lines, r.debug_lines, r.other_io, r.mmio
                )
            })
        }
    };
    match done {
        Ok(line) => {
            console.line(ihmi_abi::NESTED_L1_VMM, &line);
            ExitCode::SUCCESS
        }
        Err(e) => {
            console.line(ihmi_abi::NESTED_L1_VMM, &format!("error: {e:#}"));
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
        let probe = |cpuids, alias, vmfunc| {
            Ok(Mode::Probe {
                cpuids,
                alias,
                vmfunc,
            })
        };
        assert_eq!(args("--probe"), probe(1000, None, false));
        assert_eq!(args("--cpuids 7 --probe"), probe(7, None, false));
        assert_eq!(
            args("--probe --attack-alias 0x106ec47"),
            probe(1000, Some(0x106_ec47), false)
        );
        assert_eq!(args("--probe --attack-vmfunc"), probe(1000, None, true));
        // The L2 prefix and the line's start are the judge's.
        assert_eq!(
            format!(
                "{}ihmi-l2: VMFUNC raised #UD, times: ",
                ihmi_abi::NESTED_L2_DEBUG
            ),
            ihmi_abi::attack::IHMI_L2_VMFUNC_REPORT
        );
    }

    #[test]
    fn parses_linux() {
        let boot = |kernel: &str, initrd: &str, cmdline: &str, mem_mib, status_secs| {
            Ok(Mode::Linux(linux::Boot {
                kernel: kernel.into(),
                initrd: initrd.into(),
                cmdline: cmdline.into(),
                mem_mib,
                status_secs,
            }))
        };
        assert_eq!(args("--linux k i"), boot("k", "i", DEFAULT_CMDLINE, 64, 10));
        let got = parse(
            [
                "--mem",
                "48",
                "--cmdline",
                "console=ttyS0 -- a b",
                "--linux",
                "k",
                "i",
                "--status",
                "2",
            ]
            .map(String::from),
        );
        assert_eq!(got, boot("k", "i", "console=ttyS0 -- a b", 48, 2));
    }

    #[test]
    fn debug_pieces_fit_l0_lines_and_all_carry_the_prefix() {
        let max = ihmi_abi::DEBUG_LINE_MAX;
        assert_eq!(debug_pieces("p: ", ""), ["p: "]);
        assert_eq!(debug_pieces("p: ", "abc"), ["p: abc"]);
        let long = "x".repeat(300) + "é" + &"y".repeat(200);
        let pieces = debug_pieces("l2 console: ", &long);
        assert!(pieces
            .iter()
            .all(|p| p.len() <= max && p.starts_with("l2 console: ")));
        let joined: String = pieces.iter().map(|p| &p["l2 console: ".len()..]).collect();
        assert_eq!(joined, long);
        assert_eq!(pieces[0].len(), max);
        // The done line the judge looks for starts a piece.
        let done = format!("{}linux done: ", ihmi_abi::NESTED_L1_VMM);
        assert_eq!(done, ihmi_abi::NESTED_LINUX_DONE);
        assert_eq!(
            format!(
                "{}ihmi-l2-init: a Linux L2 ran its /init",
                ihmi_abi::NESTED_L2_DEBUG
            ),
            ihmi_abi::NESTED_LINUX_L2_INIT
        );
    }

    #[test]
    fn rejects_bad_command_lines() {
        for bad in [
            "",
            "--cpuids 5",
            "--probe --cpuids",
            "--probe --cpuids 0",
            "--probe -x",
            "--linux",
            "--linux k",
            "--linux k i --probe",
            "--linux k i --cpuids 3",
            "--linux k i --mem 8",
            "--linux k i --mem 2048",
            "--linux k i --cmdline",
            "--probe --mem 64",
            "--probe --status 1",
            "--probe --attack-alias",
            "--probe --attack-alias 106ec47",
            "--probe --attack-alias 0x106effd",
            "--linux k i --attack-alias 0x1000",
            "--linux k i --attack-vmfunc",
            "--linux k i --status 0",
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }
}
