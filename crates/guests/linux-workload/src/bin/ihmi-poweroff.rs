//! Ends a Linux guest run the way L0 can judge it: writes its arguments as one line to port 0xE9 (which
//! L0 intercepts and relays as a `guest|` line) and then "Shutdown" to port 0x8900 (Bochs's power-off
//! port, which L0 intercepts first). Run as root from the guest's /init.

use std::process::ExitCode;

const DEBUG_PORT: u16 = 0xe9;
const SHUTDOWN_PORT: u16 = 0x8900;

fn outb(port: u16, value: u8) {
    // SAFETY: the port was granted with ioperm below; OUT to it has no effect on this process's memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem))
    };
}

fn grant(port: u16) -> std::io::Result<()> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(libc::c_ulong::from(port), 1, 1) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = grant(DEBUG_PORT).and_then(|()| grant(SHUTDOWN_PORT)) {
        eprintln!("ihmi-poweroff: ioperm: {e} (run as root)");
        return ExitCode::FAILURE;
    }
    let line = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    for b in line.bytes().chain(std::iter::once(b'\n')) {
        outb(DEBUG_PORT, b);
    }
    for b in b"Shutdown" {
        outb(SHUTDOWN_PORT, *b);
    }
    eprintln!("ihmi-poweroff: still running: this is not a machine L0 runs");
    ExitCode::FAILURE
}
