//! The guest side of the hypercall ABI (`ihmi-abi`).

use core::fmt;

use ihmi_abi::{Hypercall, CONSOLE_MAX};

/// VMCALL with `nr` in RAX and `args` in RBX, RCX, RDX, RSI; returns (RAX, RBX).
pub fn hypercall(nr: u64, args: [u64; 4]) -> (u64, u64) {
    let status: u64;
    let value: u64;
    // SAFETY: VMCALL in VMX non-root operation exits to L0, which follows the documented ABI and changes
    // only RAX and RBX. RBX is reserved by the compiler, so it is swapped in and out around the call.
    unsafe {
        core::arch::asm!(
            "xchg {b}, rbx",
            "vmcall",
            "xchg {b}, rbx",
            b = inout(reg) args[0] => value,
            inout("rax") nr => status,
            in("rcx") args[1],
            in("rdx") args[2],
            in("rsi") args[3],
        );
    }
    (status, value)
}

/// Formats into a buffer and prints it through `ConsoleWrite`.
pub struct GuestConsole {
    buf: [u8; CONSOLE_MAX as usize],
    len: usize,
}

impl GuestConsole {
    pub const fn new() -> Self {
        Self {
            buf: [0; CONSOLE_MAX as usize],
            len: 0,
        }
    }

    pub fn flush(&mut self) {
        if self.len > 0 {
            hypercall(
                Hypercall::ConsoleWrite as u64,
                [self.buf.as_ptr() as u64, self.len as u64, 0, 0],
            );
            self.len = 0;
        }
    }
}

impl fmt::Write for GuestConsole {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}
