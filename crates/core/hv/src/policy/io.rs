//! Port I/O policy. Only the ports in [`INTERCEPTED_PORTS`] exit; the rest go to the devices directly.

use ihmi_vmcs::{Instruction, IoQualification};

use crate::{
    skip_instruction, Action, GuestEnd, Hypervisor, Observation, Observer, Platform, Vcpu,
};

/// The debug console port. Guest bytes are collected into lines and printed with a `guest|` prefix, so a
/// guest can never produce a line that starts like one of L0's markers.
pub const DEBUG_PORT: u16 = 0xe9;
/// Bochs's shutdown port: writing "Shutdown" powers the emulator off, so L0 must see it first.
pub const SHUTDOWN_PORT: u16 = 0x8900;
/// The PCI reset control register; bit 2 set in a write resets the machine.
pub const RESET_PORT: u16 = 0xcf9;

/// The keyboard controller's command port: 0xFE pulses the CPU's reset line (the classic PC reboot).
/// A guest that owns the devices must not be able to reset the machine under L0, so this port exits;
/// every other command goes on to the controller.
pub const KBC_PORT: u16 = 0x64;
/// The keyboard controller command that resets the machine.
const KBC_RESET: u8 = 0xfe;

/// QEMU's isa-debug-exit device at its usual base (`-device isa-debug-exit,iobase=0xf4`): a write
/// ends the machine with status `(value << 1) | 1`. Multiboot test suites (kvm-unit-tests) end
/// their runs through it, so L0 ends the guest there with the value written. No PC device sits at
/// 0xF4.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Ports that exit to L0 (the VMCS I/O bitmaps are built from this list).
pub const INTERCEPTED_PORTS: &[u16] = &[
    DEBUG_PORT,
    SHUTDOWN_PORT,
    RESET_PORT,
    KBC_PORT,
    DEBUG_EXIT_PORT,
];

const LINE_MAX: usize = ihmi_abi::DEBUG_LINE_MAX;

/// Collects debug-port bytes into lines.
#[derive(Debug)]
pub(crate) struct LineBuffer {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }
}

impl LineBuffer {
    /// Adds a byte; calls `emit` with each finished line (at a newline, or when the buffer is full).
    fn push(&mut self, b: u8, mut emit: impl FnMut(&[u8])) {
        if b == b'\n' {
            emit(&self.buf[..self.len]);
            self.len = 0;
            return;
        }
        if self.len == LINE_MAX {
            emit(&self.buf[..self.len]);
            self.len = 0;
        }
        self.buf[self.len] = b;
        self.len += 1;
    }
}

/// Matches the byte sequence "Shutdown" the way Bochs does: any other byte restarts the match.
#[derive(Debug, Default)]
pub(crate) struct ShutdownMatcher {
    matched: usize,
}

impl ShutdownMatcher {
    const WORD: &'static [u8] = b"Shutdown";

    fn push(&mut self, b: u8) -> bool {
        if Self::WORD[self.matched] == b {
            self.matched += 1;
        } else {
            self.matched = usize::from(Self::WORD[0] == b);
        }
        if self.matched == Self::WORD.len() {
            self.matched = 0;
            return true;
        }
        false
    }
}

/// Prints a guest debug-console line, keeping only printable ASCII.
fn print_guest_line(platform: &mut impl Platform, line: &[u8]) {
    let mut clean = [0u8; LINE_MAX];
    let n = line.len().min(LINE_MAX);
    for (dst, &src) in clean.iter_mut().zip(&line[..n]) {
        *dst = if (0x20..0x7f).contains(&src) {
            src
        } else {
            b'.'
        };
    }
    let text = core::str::from_utf8(&clean[..n]).unwrap_or("");
    platform.guest_text(format_args!("guest| {text}"));
}

impl Hypervisor {
    pub(crate) fn on_io(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        q: IoQualification,
        instruction: Instruction,
    ) -> Action {
        let rip = vcpu.read(ihmi_vmcs::fields::guest::RIP);
        if q.is_string() {
            // INS/OUTS would need the guest's segments and paging; none of our guests use them on the
            // intercepted ports, and emulating them wrongly would be worse than stopping.
            return Action::End(GuestEnd::Unhandled {
                reason: ihmi_vmcs::ExitReason::IoInstruction,
                qualification: q.raw(),
                rip,
            });
        }
        let port = q.port();
        let size = q.size();
        obs.observe(Observation::Io {
            port,
            write: !q.is_in(),
        });
        if q.is_in() {
            let value: u32 = match port {
                DEBUG_PORT => 0xe9, // what Bochs returns, so a guest can detect the console
                KBC_PORT if size == 1 => u32::from(platform.port_in(KBC_PORT)),
                _ => 0xffff_ffff, // the other intercepted ports are write-only
            };
            let mask = if size >= 4 {
                u64::from(u32::MAX)
            } else {
                (1u64 << (size * 8)) - 1
            };
            let regs = vcpu.regs();
            regs.rax = (regs.rax & !mask) | (u64::from(value) & mask);
            skip_instruction(vcpu, instruction);
            return Action::Resume;
        }
        let byte = vcpu.regs().rax as u8;
        let value = match size {
            1 => u32::from(byte),
            2 => u32::from(vcpu.regs().rax as u16),
            _ => vcpu.regs().rax as u32,
        };
        match port {
            DEBUG_PORT => {
                let exits = self.counters.total();
                self.e9_line.push(byte, |line| {
                    print_guest_line(platform, line);
                    obs.observe(Observation::DebugLine { line, exits });
                });
            }
            SHUTDOWN_PORT if self.shutdown_port.push(byte) => {
                return Action::End(GuestEnd::ShutdownRequest);
            }
            RESET_PORT if byte & 0b100 != 0 => return Action::End(GuestEnd::ResetRequest),
            KBC_PORT if byte == KBC_RESET => return Action::End(GuestEnd::ResetRequest),
            KBC_PORT if size == 1 => platform.port_out(KBC_PORT, byte),
            DEBUG_EXIT_PORT => return Action::End(GuestEnd::DebugExit(value)),
            _ => {}
        }
        skip_instruction(vcpu, instruction);
        Action::Resume
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_matcher_needs_the_whole_word_in_order() {
        let mut m = ShutdownMatcher::default();
        assert!(!b"Shutdow".iter().any(|&b| m.push(b)));
        assert!(m.push(b'n'));
        let mut m = ShutdownMatcher::default();
        assert!(!b"ShutXdown".iter().any(|&b| m.push(b)));
        let mut m = ShutdownMatcher::default();
        assert!(
            b"SShutdown".iter().any(|&b| m.push(b)),
            "a repeated first byte restarts the match"
        );
    }

    #[test]
    fn line_buffer_splits_on_newline_and_when_full() {
        extern crate std;
        use std::vec::Vec;
        let mut l = LineBuffer::default();
        let mut lines: Vec<Vec<u8>> = Vec::new();
        for &b in b"hi\n\n" {
            l.push(b, |line| lines.push(line.to_vec()));
        }
        assert_eq!(lines, [b"hi".to_vec(), Vec::new()]);
        lines.clear();
        for _ in 0..LINE_MAX + 1 {
            l.push(b'x', |line| lines.push(line.to_vec()));
        }
        assert_eq!(
            lines,
            [[b'x'; LINE_MAX].to_vec()],
            "the byte after a full line starts the next one"
        );
    }
}
