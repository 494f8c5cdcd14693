//! Integrity property P7 of the in-hypervisor monitor (NESTED.md B.1.3): the hook in KVM's exit path
//! keeps firing. L0 counts the exits of L2 it reflects to L1; the monitor counts the KVM exits it
//! serves (`IHMI_KVM_EXITS`, in its own frames). KVM hands every exit of its guest to
//! `vmx_handle_exit` but the fast-path re-entries of `vcpu_enter_guest` (6.1: a few MSR writes
//! handled with interrupts off), so the two counts move together; an L1 that makes its exits bypass
//! the hook (a patched call site, which the text lock stops first, or L2 run from code of its own)
//! shows as reflected exits with no KVM exit served. The check allows for fast paths by windows: if
//! [`WINDOW`] reflected exits go by without one exit served, the hook has stopped, and L0 says so
//! once. The bound: a hook that stops is noticed within [`WINDOW`] reflected exits.

/// Reflected exits within which a working hook serves at least one.
pub const WINDOW: u64 = 64;

/// The counts at the start of the current window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookLiveness {
    reflected: u64,
    served: u64,
    alerted: bool,
}

/// What a window that ended without the hook firing saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Starved {
    /// Reflected exits in all, and KVM exits the monitor served in all.
    pub reflected: u64,
    pub served: u64,
}

impl HookLiveness {
    /// Checks the totals now (`reflected` by L0, `served` by the monitor): `Some` once, when a whole
    /// window of reflected exits went by with none served.
    pub fn check(&mut self, reflected: u64, served: u64) -> Option<Starved> {
        if reflected.saturating_sub(self.reflected) < WINDOW {
            return None;
        }
        let starved = served == self.served;
        self.reflected = reflected;
        self.served = served;
        if starved && !self.alerted {
            self.alerted = true;
            return Some(Starved { reflected, served });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    #[test]
    fn a_working_hook_passes_fast_paths_and_a_stopped_one_is_said_once_within_a_window() {
        let mut l = HookLiveness::default();
        // Every exit served, or most of them (a fast path now and then): nothing to say.
        for n in 1..=1000 {
            assert_eq!(l.check(n, n - n / 10), None);
        }
        // The hook stops at 1000: said within one window, once.
        let mut said = Vec::new();
        for n in 1001..=1000 + 3 * WINDOW {
            if let Some(s) = l.check(n, 900) {
                said.push((n, s));
            }
        }
        assert_eq!(said.len(), 1);
        let (at, s) = said[0];
        assert!(at <= 1000 + 2 * WINDOW, "noticed late: {at}");
        assert_eq!(s.served, 900);
    }

    #[test]
    fn no_reflected_exits_is_not_starvation() {
        let mut l = HookLiveness::default();
        assert_eq!(l.check(0, 0), None);
        assert_eq!(l.check(WINDOW - 1, 0), None);
        assert!(l.check(WINDOW, 0).is_some());
    }
}
