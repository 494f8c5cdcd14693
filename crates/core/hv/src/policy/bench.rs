//! The `Bench` hypercall's rule: a benchmark window opens with a start mark and closes with the end
//! mark of the same window; one window is open at a time. A mark that breaks the rule is an invalid
//! argument, refused like any other, and the guest goes on. What a window measured is for an
//! observer to count (`ihmi-judge`'s benchmark windows): the hypervisor only checks and reports.

use ihmi_abi::bench::Bench;
use ihmi_abi::Status;

use crate::BenchMark;

/// The window the guest has open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BenchWindow {
    open: Option<Bench>,
}

impl BenchWindow {
    /// Checks one mark: RBX = the window, RCX = 0 (start) or 1 (end), RDX and RSI = at the end, the
    /// guest's TSC delta and the calls measured. `exits` is the guest's exit count so far.
    pub(crate) fn mark(
        &mut self,
        bench: u64,
        phase: u64,
        tsc: u64,
        calls: u64,
        exits: u64,
    ) -> Result<BenchMark, Status> {
        let bench = Bench::from_raw(bench).ok_or(Status::InvalidArgument)?;
        let end = match (phase, self.open) {
            (0, None) => false,
            (1, Some(open)) if open == bench => true,
            // A second start, an end of a window that is not open, or an unknown phase.
            _ => return Err(Status::InvalidArgument),
        };
        self.open = if end { None } else { Some(bench) };
        Ok(BenchMark {
            bench,
            end,
            tsc: if end { tsc } else { 0 },
            calls: if end { calls } else { 0 },
            guest_exits: exits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_open_and_close_in_pairs() {
        let mut w = BenchWindow::default();
        let null = Bench::InvokeNull as u64;
        assert_eq!(
            w.mark(null, 1, 5, 5, 1),
            Err(Status::InvalidArgument),
            "an end without a start"
        );
        let start = w.mark(null, 0, 9, 9, 2).unwrap();
        assert_eq!((start.end, start.tsc, start.calls), (false, 0, 0));
        assert_eq!(
            w.mark(null, 0, 0, 0, 3),
            Err(Status::InvalidArgument),
            "nested start"
        );
        assert_eq!(
            w.mark(Bench::InvokeSyscall as u64, 1, 0, 0, 3),
            Err(Status::InvalidArgument),
            "the end of another window"
        );
        assert_eq!(
            w.mark(null, 2, 0, 0, 3),
            Err(Status::InvalidArgument),
            "unknown phase"
        );
        assert_eq!(
            w.mark(99, 0, 0, 0, 3),
            Err(Status::InvalidArgument),
            "unknown window"
        );
        let end = w.mark(null, 1, 1000, 20, 4).unwrap();
        assert_eq!(
            (end.bench, end.end, end.tsc, end.calls, end.guest_exits),
            (Bench::InvokeNull, true, 1000, 20, 4)
        );
        assert!(w.mark(null, 1, 0, 0, 5).is_err(), "closed once only");
    }
}
