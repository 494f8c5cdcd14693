//! Ends a Linux guest run the way L0 can judge it: its arguments as one line on port 0xE9, then the
//! power-off request on port 0x8900. Run as root from the guest's /init.

use std::process::ExitCode;

fn main() -> ExitCode {
    let line = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    if let Err(e) =
        ihmi_linux_workload::debug_line(&line).and_then(|()| ihmi_linux_workload::power_off())
    {
        eprintln!("ihmi-poweroff: ioperm: {e} (run as root)");
        return ExitCode::FAILURE;
    }
    eprintln!("ihmi-poweroff: still running: this is not a machine L0 runs");
    ExitCode::FAILURE
}
