//! What the Linux guest's programs share: the two I/O ports L0 watches, and port I/O for the others a
//! program is granted. A line written to port 0xE9 reaches L0, which relays it as a `guest|` line;
//! "Shutdown" written to port 0x8900 ends the run (Bochs's power-off port, which L0 intercepts first).
//! Root only: the ports are granted with ioperm.

use std::io;

/// The debug port: bytes written here reach L0 (and, from a guest of a guest, that guest's VMM).
pub const DEBUG_PORT: u16 = 0xe9;
/// The power-off port: "Shutdown" written here ends the run.
pub const SHUTDOWN_PORT: u16 = 0x8900;

/// OUT of one byte to a port [`grant`]ed to this process (one that is not faults the process).
pub fn outb(port: u16, value: u8) {
    // SAFETY: OUT changes no memory of this process; an ungranted port is a #GP the kernel turns into
    // a signal.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem))
    };
}

/// IN of one byte from a port [`grant`]ed to this process.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        std::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nostack, nomem))
    };
    value
}

/// Asks the kernel for `count` ports from `first` (root only).
pub fn grant(first: u16, count: u16) -> io::Result<()> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    let granted =
        unsafe { libc::ioperm(libc::c_ulong::from(first), libc::c_ulong::from(count), 1) };
    if granted != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `line` and a newline to L0's debug port.
pub fn debug_line(line: &str) -> io::Result<()> {
    DebugPort::open()?.line(line);
    Ok(())
}

/// L0's debug port, once this process may use it: lines without a system call each (the benchmark's
/// marks must not add one to the windows they close).
#[derive(Debug)]
pub struct DebugPort(());

impl DebugPort {
    /// Asks the kernel for the port.
    pub fn open() -> io::Result<Self> {
        grant(DEBUG_PORT, 1)?;
        Ok(Self(()))
    }

    /// Writes `line` and a newline.
    pub fn line(&self, line: &str) {
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            outb(DEBUG_PORT, b);
        }
    }
}

/// Asks L0 to end the run. Returns only if nothing intercepted the request.
pub fn power_off() -> io::Result<()> {
    grant(SHUTDOWN_PORT, 1)?;
    for b in b"Shutdown" {
        outb(SHUTDOWN_PORT, *b);
    }
    Ok(())
}
