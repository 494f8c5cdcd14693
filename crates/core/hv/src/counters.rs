//! Per-reason exit counters, printed by `demo` and read by benchmarks.

use core::fmt;

use ihmi_vmcs::{ExitReason, EXIT_REASON_COUNT};

/// How many exits of each basic reason, and of each exception vector, L0 has handled.
#[derive(Clone, Debug)]
pub struct ExitCounters {
    by_reason: [u64; EXIT_REASON_COUNT],
    unknown: u64,
    by_vector: [u64; 32],
    total: u64,
}

impl Default for ExitCounters {
    fn default() -> Self {
        Self {
            by_reason: [0; EXIT_REASON_COUNT],
            unknown: 0,
            by_vector: [0; 32],
            total: 0,
        }
    }
}

impl ExitCounters {
    /// Counts one exit.
    pub fn record(&mut self, reason: ExitReason) {
        self.total += 1;
        match reason.index() {
            Some(i) => self.by_reason[i] += 1,
            None => self.unknown += 1,
        }
    }

    /// Counts one intercepted exception or NMI by vector.
    pub fn record_exception(&mut self, vector: u8) {
        if let Some(slot) = self.by_vector.get_mut(usize::from(vector)) {
            *slot += 1;
        }
    }

    /// Exits of one reason so far.
    #[must_use]
    pub fn get(&self, reason: ExitReason) -> u64 {
        reason.index().map_or(self.unknown, |i| self.by_reason[i])
    }

    /// Intercepted exceptions with this vector so far.
    #[must_use]
    pub fn exceptions(&self, vector: u8) -> u64 {
        self.by_vector
            .get(usize::from(vector))
            .copied()
            .unwrap_or(0)
    }

    /// All exits so far.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Reasons with a non-zero count, in exit-reason order.
    pub fn nonzero(&self) -> impl Iterator<Item = (ExitReason, u64)> + '_ {
        self.by_reason
            .iter()
            .enumerate()
            .filter(|(_, n)| **n != 0)
            .filter_map(|(i, n)| ExitReason::from_index(i).map(|r| (r, *n)))
    }
}

impl fmt::Display for ExitCounters {
    /// One `name=count` pair per reason that occurred, then the total.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (reason, n) in self.nonzero() {
            write!(f, "{}={} ", reason.name(), n)?;
        }
        if self.unknown != 0 {
            write!(f, "unknown={} ", self.unknown)?;
        }
        write!(f, "total={}", self.total)
    }
}
