//! The Linux guest's compromised root, for the `linux-attack` scenario. It tries, in order:
//! 1. to move the system-call entry off the monitor's gate, by writing IA32_LSTAR through
//!    /dev/cpu/0/msr (the kernel executes the WRMSR; L0 must refuse it);
//! 2. to read the monitor's memory through /dev/mem, page by page from the address L0 put on the
//!    kernel command line (`ihmi.monitor=`; the threat model assumes an attacker can find it). The
//!    first pages are the ones the guest is meant to see (the gate, read + execute); the first
//!    private page must stop it.
//!
//! Each step is told to L0 on port 0xE9. The second, if blocked, stops the guest: it never returns.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

use ihmi_linux_workload::debug_line;

const IA32_LSTAR: u64 = 0xc000_0082;

fn say(line: &str) {
    println!("{line}");
    let _ = debug_line(line);
}

fn main() -> ExitCode {
    let moved = OpenOptions::new()
        .write(true)
        .open("/dev/cpu/0/msr")
        .and_then(|f| f.write_at(&0xffff_ffff_8100_0000u64.to_le_bytes(), IA32_LSTAR));
    match moved {
        Ok(_) => say("ihmi-attack: moving IA32_LSTAR was ACCEPTED"),
        Err(e) => say(&format!("ihmi-attack: moving IA32_LSTAR was refused ({e})")),
    }

    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(monitor) = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ihmi.monitor=0x"))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
    else {
        say("ihmi-attack: no ihmi.monitor= on the command line");
        return ExitCode::FAILURE;
    };
    let mem = match fs::File::open("/dev/mem") {
        Ok(f) => f,
        Err(e) => {
            say(&format!("ihmi-attack: /dev/mem: {e}"));
            return ExitCode::FAILURE;
        }
    };
    // The monitor takes 2 MiB; walk it a page at a time.
    for page in 0..512u64 {
        let at = monitor + page * 4096;
        say(&format!("ihmi-attack: reading {at:#x} through /dev/mem"));
        let mut stolen = [0u8; 16];
        match mem.read_exact_at(&mut stolen, at) {
            Ok(()) => say(&format!("ihmi-attack: read {at:#x}: {stolen:02x?}")),
            Err(e) => say(&format!("ihmi-attack: {at:#x}: {e}")),
        }
    }
    say("ihmi-attack: the whole monitor region was readable");
    ExitCode::FAILURE
}
