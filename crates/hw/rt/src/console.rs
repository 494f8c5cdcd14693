//! A stateless console on COM1 and the 0xE9 debug port.
//!
//! Stateless on purpose: L0 runs with interrupts off on one CPU, but an exception handler may print in
//! the middle of another print, and a lock would deadlock there.

use core::fmt;

/// I/O base of the first 16550 UART.
pub const COM1: u16 = 0x3f8;
/// The Bochs/QEMU debug console port; Bochs copies each byte to its standard output.
pub const DEBUG_PORT: u16 = 0xe9;

/// Where bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    /// COM1 and port 0xE9 (L0's log).
    Both,
    /// COM1 only.
    Serial,
}

/// Programs COM1 for 115200 8N1 with FIFOs; polling only, no interrupts.
pub fn init_serial() {
    let uart = |offset: u16, value: u8| {
        // SAFETY: the offsets used below are registers of the COM1 UART; writing them programs it and
        // touches nothing else.
        unsafe { x86::io::outb(COM1 + offset, value) }
    };
    uart(1, 0x00); // no interrupts
    uart(3, 0x80); // DLAB on
    uart(0, 0x01); // divisor 1 = 115200 baud
    uart(1, 0x00);
    uart(3, 0x03); // 8N1, DLAB off
    uart(2, 0xc7); // FIFO on, cleared, 14-byte threshold
    uart(4, 0x03); // DTR, RTS
}

fn serial_byte(b: u8) {
    // Bounded wait: a missing UART must not hang L0 (reads of an absent port return 0xff).
    for _ in 0..100_000 {
        // SAFETY: reading the line status register has no side effect.
        if unsafe { x86::io::inb(COM1 + 5) } & 0x20 != 0 {
            break;
        }
    }
    // SAFETY: writing the transmit register of COM1 sends one byte.
    unsafe { x86::io::outb(COM1, b) };
}

/// Waits (bounded) until COM1 has sent every byte, so a power-off right after cannot cut the last line.
pub fn drain_serial() {
    for _ in 0..1_000_000 {
        // SAFETY: reading the line status register has no side effect.
        if unsafe { x86::io::inb(COM1 + 5) } & 0x40 != 0 {
            return;
        }
    }
}

/// Writes raw bytes to the chosen sink, turning `\n` into `\r\n` on the UART.
pub fn write_bytes(sink: Sink, bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            serial_byte(b'\r');
        }
        serial_byte(b);
        if sink == Sink::Both {
            // SAFETY: port 0xE9 is the emulator's debug console; on real hardware the write is ignored.
            unsafe { x86::io::outb(DEBUG_PORT, b) };
        }
    }
}

/// A `fmt::Write` handle on the console.
#[derive(Clone, Copy, Debug)]
pub struct Console(pub Sink);

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(self.0, s.as_bytes());
        Ok(())
    }
}
