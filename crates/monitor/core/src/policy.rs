//! The process-creation policy: an allow-list of process names, as the seed paper's process-creation
//! monitor enforced. An empty list allows everything (monitoring without enforcement).

use ihmi_abi::guest_os::COMM_LEN;
use ihmi_abi::monitor::Verdict;

use crate::event::comm_bytes;

/// Most names an allow-list holds.
pub const MAX_NAMES: usize = 16;

/// Why a name could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyError {
    /// The list already holds [`MAX_NAMES`].
    Full,
    /// Empty, longer than [`COMM_LEN`], or containing a NUL.
    BadName,
}

/// The allow-list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    names: [[u8; COMM_LEN]; MAX_NAMES],
    count: usize,
}

impl Policy {
    /// No list: every creation is allowed.
    #[must_use]
    pub const fn allow_all() -> Self {
        Self {
            names: [[0; COMM_LEN]; MAX_NAMES],
            count: 0,
        }
    }

    /// Adds `name` to the list; from then on only listed names may be created.
    pub fn allow(&mut self, name: &[u8]) -> Result<(), PolicyError> {
        if name.is_empty() || name.len() > COMM_LEN || name.contains(&0) {
            return Err(PolicyError::BadName);
        }
        let slot = self.names.get_mut(self.count).ok_or(PolicyError::Full)?;
        slot.fill(0);
        slot[..name.len()].copy_from_slice(name);
        self.count += 1;
        Ok(())
    }

    /// Whether the policy enforces a list.
    #[must_use]
    pub const fn is_enforcing(&self) -> bool {
        self.count > 0
    }

    /// The verdict on creating a process named `comm` (compared up to its first NUL).
    #[must_use]
    pub fn check_create(&self, comm: &[u8; COMM_LEN]) -> Verdict {
        if !self.is_enforcing() {
            return Verdict::Allow;
        }
        let name = comm_bytes(comm);
        if self.names[..self.count]
            .iter()
            .any(|n| comm_bytes(n) == name)
        {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comm(s: &[u8]) -> [u8; COMM_LEN] {
        let mut c = [0u8; COMM_LEN];
        c[..s.len()].copy_from_slice(s);
        c
    }

    #[test]
    fn allow_list_matches_whole_names_only() {
        let mut p = Policy::allow_all();
        assert_eq!(p.check_create(&comm(b"anything")), Verdict::Allow);
        p.allow(b"init").unwrap();
        p.allow(b"worker").unwrap();
        assert_eq!(p.check_create(&comm(b"init")), Verdict::Allow);
        assert_eq!(p.check_create(&comm(b"worker")), Verdict::Allow);
        assert_eq!(p.check_create(&comm(b"intruder")), Verdict::Deny);
        assert_eq!(p.check_create(&comm(b"ini")), Verdict::Deny, "prefix");
        assert_eq!(p.check_create(&comm(b"init2")), Verdict::Deny, "longer");
        assert_eq!(p.check_create(&comm(b"")), Verdict::Deny, "empty name");
    }

    #[test]
    fn bad_names_and_a_full_list_are_refused() {
        let mut p = Policy::allow_all();
        assert_eq!(p.allow(b""), Err(PolicyError::BadName));
        assert_eq!(p.allow(b"a\0b"), Err(PolicyError::BadName));
        assert_eq!(p.allow(&[b'x'; COMM_LEN + 1]), Err(PolicyError::BadName));
        for i in 0..MAX_NAMES {
            p.allow(&[b'a' + i as u8]).unwrap();
        }
        assert_eq!(p.allow(b"z"), Err(PolicyError::Full));
    }
}
